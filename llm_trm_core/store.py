"""Content-addressed artifact store over fsspec (DESIGN §3).

Layout: `{root}/{stage}/{key}/` holds the stage's files and, written last, `_MANIFEST.json`: the
commit marker. A folder without a manifest is never read as an output. Every file is written to a
temporary name and then moved into place (on object stores: copy + delete, since their `mv` can be
slow), so a reader never sees a half-written file under its final name.

    store = ArtifactStore("file://./artifacts")
    key = stage_key("problems", "1", cfg_dict, upstream={})
    with store.writer("problems", key, config=cfg_dict) as w:
        w.write_bytes("problems.parquet", data)
        w.commit(metrics={"rows": 10})
    art = store.open("problems", key)          # verified against the manifest
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import fsspec
from fsspec.spec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict

from llm_trm_core.errors import ArtifactCorruptError, ArtifactError, ArtifactNotCommittedError, TransientError
from llm_trm_core.provenance import git_sha, package_version

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_SCHEMA_VERSION = 1
TMP_MARKER = ".tmp-"
CHECKPOINTS_DIR = "checkpoints"
CHEAP_SHA_BYTES = 1 << 20  # files up to 1 MiB get their sha256 checked on every open
_OBJECT_STORE_PROTOCOLS = {"gs", "gcs", "s3", "s3a", "az", "abfs", "abfss"}


def stage_key(stage: str, code_version: str, config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """sha256 of (stage, code version, canonical JSON of the resolved stage config, upstream keys)."""
    payload = {
        "stage": stage,
        "code_version": code_version,
        "config": config,
        "upstream": dict(sorted(upstream.items())),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int
    sha256: str


class Manifest(BaseModel):
    """The commit record of one artifact. Small and JSON-able: this is what Prefect tasks return."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = MANIFEST_SCHEMA_VERSION
    stage: str
    key: str
    uri: str
    code_version: str
    config: dict[str, Any]
    upstream: dict[str, str]
    files: dict[str, FileEntry]
    metrics: dict[str, Any]
    package_version: str
    git_sha: str | None
    created_at: str
    completed_at: str


class ArtifactStore:
    """A root URI (file://, memory://, gs://...) holding stage artifacts."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if root.startswith(("gs://", "gcs://")):
            # gcsfs reads this at import; its experimental default probes a gRPC API that standard
            # buckets and the emulator do not serve (each access then stalls ~60 s).
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        try:
            fs, base = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise ArtifactError(f"cannot open artifact store {root!r}: {exc}") from exc
        self.fs: AbstractFileSystem = fs
        self.base: str = base.rstrip("/")
        self.root: str = fs.unstrip_protocol(self.base)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.is_object_store = bool(protocols & _OBJECT_STORE_PROTOCOLS)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # -- paths -------------------------------------------------------------------------------
    def path(self, stage: str, key: str, *parts: str) -> str:
        return "/".join([self.base, stage, key, *parts])

    def uri(self, stage: str, key: str, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(stage, key, *parts))

    @contextmanager
    def reachable(self) -> Iterator[None]:
        """Turn storage/network failures (other than a missing file) into a TransientError naming the store."""
        try:
            yield
        except (FileNotFoundError, ArtifactError):
            raise
        except PermissionError as exc:
            raise ArtifactError(
                f"no permission on the artifact store {self.root}: {exc}; check its credentials"
            ) from exc
        except OSError as exc:
            raise TransientError(
                f"cannot reach the artifact store {self.root}: {exc.__class__.__name__}: {exc}. Check the network, "
                "the bucket name and credentials (or STORAGE_EMULATOR_HOST for a local emulator)."
            ) from exc

    # -- reading -----------------------------------------------------------------------------
    def read_manifest(self, stage: str, key: str) -> Manifest | None:
        """The manifest if the artifact is committed, else None."""
        path = self.path(stage, key, MANIFEST_NAME)
        try:
            with self.reachable(), self.fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise ArtifactCorruptError(
                f"{self.uri(stage, key, MANIFEST_NAME)} is not a valid manifest ({exc}); "
                "delete the folder to recompute the stage"
            ) from exc

    def is_committed(self, stage: str, key: str) -> bool:
        with self.reachable():
            return bool(self.fs.exists(self.path(stage, key, MANIFEST_NAME)))

    def open(self, stage: str, key: str, verify: Literal["size", "sha256"] = "size") -> Artifact:
        """A committed artifact, checked against its manifest.

        verify="size" checks every file's size and the sha256 of small files; "sha256" hashes all.
        """
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            folder = self.uri(stage, key)
            if self.fs.exists(self.path(stage, key)):
                hint = (
                    "the folder exists but has no manifest: its writer was interrupted or is still "
                    "running. Re-run the stage to resume or recompute it."
                )
            else:
                hint = "nothing was written there; run the stage first."
            raise ArtifactNotCommittedError(f"artifact {folder} is not committed: {hint}")
        artifact = Artifact(self, manifest)
        artifact.verify(deep=verify == "sha256")
        return artifact

    def list_keys(self, stage: str) -> list[str]:
        """Keys of committed artifacts of a stage."""
        stage_dir = f"{self.base}/{stage}"
        if not self.fs.exists(stage_dir):
            return []
        keys = []
        for entry in self.fs.ls(stage_dir, detail=False):
            key = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if self.is_committed(stage, key):
                keys.append(key)
        return sorted(keys)

    # -- writing -----------------------------------------------------------------------------
    def writer(
        self,
        stage: str,
        key: str,
        *,
        config: Mapping[str, Any],
        code_version: str,
        upstream: Mapping[str, str] | None = None,
    ) -> ArtifactWriter:
        if self.is_committed(stage, key):
            raise ArtifactError(
                f"artifact {self.uri(stage, key)} is already committed; stages must read it instead of writing it again"
            )
        return ArtifactWriter(self, stage, key, config=config, code_version=code_version, upstream=upstream or {})

    def publish(self, tmp_path: str, final_path: str) -> None:
        """Move a fully written temporary file to its final name."""
        try:
            if self.is_object_store:
                self.fs.copy(tmp_path, final_path)
                self.fs.rm(tmp_path)
            else:
                self.fs.mv(tmp_path, final_path)
        except OSError as exc:
            raise TransientError(f"could not publish {final_path}: {exc}") from exc


class Artifact:
    """A committed artifact. Read files through it; never write."""

    def __init__(self, store: ArtifactStore, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest

    @property
    def stage(self) -> str:
        return self.manifest.stage

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def uri(self) -> str:
        return self.store.uri(self.stage, self.key)

    def path(self, relpath: str) -> str:
        self._require(relpath)
        return self.store.path(self.stage, self.key, relpath)

    def file_uri(self, relpath: str) -> str:
        self._require(relpath)
        return self.store.uri(self.stage, self.key, relpath)

    def open(self, relpath: str) -> IO[bytes]:
        return self.store.fs.open(self.path(relpath), "rb")

    def read_bytes(self, relpath: str) -> bytes:
        with self.open(relpath) as f:
            return f.read()

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    def files(self, prefix: str = "") -> list[str]:
        return sorted(p for p in self.manifest.files if p.startswith(prefix))

    def verify(self, deep: bool = False) -> None:
        """Raise ArtifactCorruptError if a file is missing or differs from the manifest."""
        fs = self.store.fs
        folder = self.store.path(self.stage, self.key)
        try:
            found = fs.find(folder, detail=True)
        except FileNotFoundError:
            found = {}
        sizes = {}
        for path, info in found.items():
            rel = str(path)[len(folder) :].lstrip("/") if str(path).startswith(folder) else str(path)
            sizes[rel] = int(info.get("size") or 0)
        for rel, entry in self.manifest.files.items():
            if rel not in sizes:
                raise ArtifactCorruptError(
                    f"{self.file_uri(rel)} is listed in the manifest but missing; delete "
                    f"{self.uri} to recompute the stage"
                )
            if sizes[rel] != entry.size:
                raise ArtifactCorruptError(
                    f"{self.file_uri(rel)} has {sizes[rel]} bytes, the manifest says {entry.size}; delete "
                    f"{self.uri} to recompute the stage"
                )
            if deep or entry.size <= CHEAP_SHA_BYTES:
                digest = _sha256_of(fs, self.store.path(self.stage, self.key, rel))
                if digest != entry.sha256:
                    raise ArtifactCorruptError(
                        f"{self.file_uri(rel)} does not match its sha256 in the manifest; delete "
                        f"{self.uri} to recompute the stage"
                    )

    def _require(self, relpath: str) -> None:
        if relpath not in self.manifest.files:
            known = ", ".join(sorted(self.manifest.files)) or "(none)"
            raise ArtifactError(f"artifact {self.uri} has no file {relpath!r}; it has: {known}")


class _HashingFile(io.RawIOBase):
    """Writable file wrapper that counts and hashes bytes on their way to the inner file."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.inner.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


class ArtifactWriter:
    """Writes one artifact: files first (each atomically), the manifest last (`commit`)."""

    def __init__(
        self,
        store: ArtifactStore,
        stage: str,
        key: str,
        *,
        config: Mapping[str, Any],
        code_version: str,
        upstream: Mapping[str, str],
    ) -> None:
        self.store = store
        self.stage = stage
        self.key = key
        self.config = dict(config)
        self.code_version = code_version
        self.upstream = dict(upstream)
        self.files: dict[str, FileEntry] = {}
        self.created_at = _now()
        self.manifest: Manifest | None = None
        self._remove_stale_temporaries()

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and self.manifest is None:
            raise ArtifactError(f"writer for {self.uri} closed without commit(); the artifact stays uncommitted")

    @property
    def uri(self) -> str:
        return self.store.uri(self.stage, self.key)

    def final_path(self, relpath: str) -> str:
        _check_relpath(relpath)
        return self.store.path(self.stage, self.key, relpath)

    @contextmanager
    def open(self, relpath: str) -> Iterator[IO[bytes]]:
        """Binary file to write `relpath`; published under its final name when the block exits cleanly."""
        final = self.final_path(relpath)
        tmp = f"{final}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
        fs = self.store.fs
        parent = final.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            yield hashing  # type: ignore[misc]
        self.store.publish(tmp, final)
        self.files[relpath] = FileEntry(size=hashing.size, sha256=hashing.sha.hexdigest())

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self.open(relpath) as f:
            f.write(data)

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))

    def put_file(self, local_path: str | Path, relpath: str) -> None:
        """Upload a finished local file (e.g. a safetensors export)."""
        with open(local_path, "rb") as src, self.open(relpath) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)

    def adopt(self, relpath: str) -> None:
        """Record a file already published under its final name by an earlier, interrupted attempt."""
        final = self.final_path(relpath)
        fs = self.store.fs
        if not fs.exists(final):
            raise ArtifactError(f"cannot adopt {self.store.fs.unstrip_protocol(final)}: it does not exist")
        size = int(fs.info(final)["size"])
        self.files[relpath] = FileEntry(size=size, sha256=_sha256_of(fs, final))

    def commit(self, metrics: Mapping[str, Any] | None = None) -> Manifest:
        """Write `_MANIFEST.json` last: from now on the artifact exists for every reader."""
        manifest = Manifest(
            stage=self.stage,
            key=self.key,
            uri=self.uri,
            code_version=self.code_version,
            config=self.config,
            upstream=self.upstream,
            files=dict(sorted(self.files.items())),
            metrics=dict(metrics or {}),
            package_version=package_version(),
            git_sha=git_sha(),
            created_at=self.created_at,
            completed_at=_now(),
        )
        body = manifest.model_dump_json(indent=2).encode("utf-8")
        final = self.store.path(self.stage, self.key, MANIFEST_NAME)
        tmp = f"{final}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
        with self.store.fs.open(tmp, "wb") as f:
            f.write(body)
        self.store.publish(tmp, final)
        self.manifest = manifest
        logger.info("committed %s (%d files)", self.uri, len(self.files))
        return manifest

    def _remove_stale_temporaries(self) -> None:
        folder = self.store.path(self.stage, self.key)
        fs = self.store.fs
        if not fs.exists(folder):
            return
        for path in fs.find(folder):
            name = str(path).rsplit("/", 1)[-1]
            if TMP_MARKER in name:
                logger.info("removing a temporary file left by an interrupted writer: %s", path)
                fs.rm(path)


def _check_relpath(relpath: str) -> None:
    parts = relpath.split("/")
    if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"invalid artifact file name {relpath!r}: use a relative path like 'shards/0.parquet'")
    if parts[-1] == MANIFEST_NAME or TMP_MARKER in relpath:
        raise ArtifactError(f"artifact file name {relpath!r} is reserved")


def _sha256_of(fs: AbstractFileSystem, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()
