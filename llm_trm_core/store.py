"""Content-addressed artifact store over fsspec (docs/architecture.md, "Store").

Layout: `{root}/{stage}/{key}/` holds the stage's files and, written last, `_MANIFEST.json`: the
commit marker. A folder without a manifest is never read as an output. Every file is written to a
temporary name and then moved into place (on object stores: copy + delete, since their `mv` can be
slow), so a reader never sees a half-written file under its final name.

    store = ArtifactStore("file://./artifacts")
    key = stage_key("problems", "1", cfg_dict, upstream={})
    with store.writer("problems", key, config=cfg_dict) as w:
        w.write_bytes("problems.parquet", data)
        w.commit(metrics={"rows": 10})
    art = store.open("problems", key)          # files present with their sizes
    table = read_parquet(art, "problems.parquet")  # llm_trm_core.arrow; bytes verified before parsing

Integrity: what is verified, and when.
- `_MANIFEST.json` carries `manifest_sha256`, the sha256 of the canonical JSON of all its other fields
  except `uri` (a location, not content: readers report where the artifact is now). `read_manifest`
  checks it on every read, and that the manifest names the stage and key of its folder, so a hand-edited
  metric or a manifest copied into another folder is refused with an error naming the manifest.
- `open` checks that every listed file exists with its recorded size (one listing; nothing is read).
- every byte handed out is verified first: `Artifact.read_bytes` (and `read_json`, `open`) reads the
  whole file once and compares its size and digest with the manifest before returning it. Each file's
  entry records two digests of the same bytes: sha256 (provenance, `open(verify="sha256")`) and
  xxh3-128, which reads check: it runs at memory speed (~25 GB/s against sha256's ~1-2 GB/s on one core),
  so verifying costs little beside parsing, and it detects any accidental corruption (it is not meant
  to resist someone forging a file; the manifest's own sha256 still guards the recorded digests).
  Manifests written before xxh3-128 was recorded are checked with sha256. Parquet goes through
  `llm_trm_core.arrow.read_parquet`, which parses those verified bytes, so the footer, page headers and
  pages are all covered (small tables also verify the pages' own CRC32 checksums while decoding).
- any mismatch raises ArtifactCorruptError with one line: the file, what differs, and "delete <folder>
  and re-run; it will be recomputed". `open(verify="sha256")` hashes every file up front.
Not covered: training checkpoints under `checkpoints/` (resume state, never listed in a manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, overload

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from pydantic import BaseModel, ConfigDict

from llm_trm_core.errors import ArtifactCorruptError, ArtifactError, ArtifactNotCommittedError, TransientError
from llm_trm_core.provenance import git_sha, package_version

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_SCHEMA_VERSION = 2  # 2: manifest_sha256
TMP_MARKER = ".tmp-"
CHECKPOINTS_DIR = "checkpoints"
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


def recompute_hint(folder_uri: str) -> str:
    """The fix for any corrupt artifact (the same words in every integrity error)."""
    return f"delete {folder_uri} and re-run; it will be recomputed"


def manifest_digest(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest's fields, without `uri` and `manifest_sha256`."""
    content = {k: v for k, v in fields.items() if k not in ("uri", "manifest_sha256")}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int
    sha256: str
    xxh3_128: str | None = None  # what reads verify; None in manifests written before it was recorded


class Manifest(BaseModel):
    """The commit record of one artifact. Small and JSON-able: this is what Prefect tasks return."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = MANIFEST_SCHEMA_VERSION
    stage: str
    key: str
    uri: str  # where the artifact is now (the file keeps where it was committed; not part of the digest)
    code_version: str
    config: dict[str, Any]
    upstream: dict[str, str]
    files: dict[str, FileEntry]
    metrics: dict[str, Any]
    package_version: str
    git_sha: str | None
    created_at: str
    completed_at: str
    manifest_sha256: str  # manifest_digest() of the fields above


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
        """The manifest if the artifact is committed, else None; its digest, stage and key are checked."""
        path = self.path(stage, key, MANIFEST_NAME)
        try:
            with self.reachable(), self.fs.open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        where, fix = self.uri(stage, key, MANIFEST_NAME), recompute_hint(self.uri(stage, key))
        try:
            fields = json.loads(raw)
        except ValueError as exc:
            raise ArtifactCorruptError(f"{where} is not valid JSON ({exc}); {fix}") from exc
        if not isinstance(fields, dict):
            raise ArtifactCorruptError(f"{where} is not a manifest (a JSON object); {fix}")
        version = fields.get("schema_version")
        if version != MANIFEST_SCHEMA_VERSION:
            raise ArtifactCorruptError(
                f"{where} has manifest schema {version}, this llm-trm reads {MANIFEST_SCHEMA_VERSION} (with a "
                f"content digest); {fix}"
            )
        try:
            digest = manifest_digest(fields)
        except ValueError as exc:  # NaN/Infinity: never written by commit()
            raise ArtifactCorruptError(f"{where} holds a non-finite number ({exc}); {fix}") from exc
        if fields.get("manifest_sha256") != digest:
            raise ArtifactCorruptError(
                f"{where} does not match its manifest_sha256 (edited or corrupted after commit); {fix}"
            )
        try:
            manifest = Manifest.model_validate(fields)
        except ValueError as exc:
            first = str(exc).splitlines()[0]
            raise ArtifactCorruptError(f"{where} is not a valid manifest ({first}); {fix}") from exc
        if (manifest.stage, manifest.key) != (stage, key):
            raise ArtifactCorruptError(
                f"{where} belongs to {manifest.stage}/{manifest.key}, not to the folder it is in; {fix}"
            )
        return manifest.model_copy(update={"uri": self.uri(stage, key)})

    def is_committed(self, stage: str, key: str) -> bool:
        with self.reachable():
            return bool(self.fs.exists(self.path(stage, key, MANIFEST_NAME)))

    def open(self, stage: str, key: str, verify: Literal["size", "sha256"] = "size") -> Artifact:
        """A committed artifact, checked against its manifest.

        verify="size" checks that every file exists with its size (file contents are verified as they are
        read); "sha256" also hashes every file now.
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
        """The file's verified contents as an in-memory binary file (see `read_bytes`)."""
        return io.BytesIO(self.read_bytes(relpath))

    def read_bytes(self, relpath: str) -> bytes:
        """The whole file, read once and checked against the manifest's size and sha256 before it is returned."""
        self._require(relpath)
        return _read_verified(self.store, self.stage, self.key, relpath, self.manifest.files[relpath])

    def read_buffer(self, relpath: str) -> memoryview:
        """Like `read_bytes`, without copying a local file: a read-only view of the file mapped into memory
        (verified the same way). For parsers that copy what they keep (Parquet decoding)."""
        self._require(relpath)
        return _read_verified(self.store, self.stage, self.key, relpath, self.manifest.files[relpath], mapped=True)

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    def size(self, relpath: str) -> int:
        """The file's size in bytes, as the manifest lists it (nothing is read)."""
        self._require(relpath)
        return self.manifest.files[relpath].size

    def files(self, prefix: str = "") -> list[str]:
        return sorted(p for p in self.manifest.files if p.startswith(prefix))

    def verify(self, deep: bool = False) -> None:
        """Raise ArtifactCorruptError if a file is missing or has another size (deep: or sha256) than listed."""
        fs = self.store.fs
        folder = self.store.path(self.stage, self.key)
        with self.store.reachable():
            try:
                found = fs.find(folder, detail=True)
            except FileNotFoundError:
                found = {}
        sizes = {}
        for path, info in found.items():
            rel = str(path)[len(folder) :].lstrip("/") if str(path).startswith(folder) else str(path)
            sizes[rel] = int(info.get("size") or 0)
        fix = recompute_hint(self.uri)
        for rel, entry in self.manifest.files.items():
            if rel not in sizes:
                raise ArtifactCorruptError(f"{self.file_uri(rel)} is listed in the manifest but missing; {fix}")
            if sizes[rel] != entry.size:
                raise ArtifactCorruptError(
                    f"{self.file_uri(rel)} has {sizes[rel]} bytes, the manifest says {entry.size}; {fix}"
                )
            if deep:
                with self.store.reachable():
                    digest = _sha256_of(fs, self.store.path(self.stage, self.key, rel))
                if digest != entry.sha256:
                    raise ArtifactCorruptError(f"{self.file_uri(rel)} does not match its sha256 in the manifest; {fix}")

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
        self.xxh = xxhash.xxh3_128()
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        data = memoryview(b).cast("B")
        self.inner.write(data)
        self.sha.update(data)
        self.xxh.update(data)
        self.size += len(data)
        return len(data)

    def entry(self) -> FileEntry:
        return FileEntry(size=self.size, sha256=self.sha.hexdigest(), xxh3_128=self.xxh.hexdigest())

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

    def file_uri(self, relpath: str) -> str:
        return self.store.fs.unstrip_protocol(self.final_path(relpath))

    def read_bytes(self, relpath: str) -> bytes:
        """A file this writer wrote or adopted, checked against the size and sha256 it recorded."""
        return _read_verified(self.store, self.stage, self.key, relpath, self._written(relpath))

    def read_buffer(self, relpath: str) -> memoryview:
        """`read_bytes` as a mapped view for local files (see `Artifact.read_buffer`)."""
        return _read_verified(self.store, self.stage, self.key, relpath, self._written(relpath), mapped=True)

    def size(self, relpath: str) -> int:
        """The size in bytes of a file this writer wrote (nothing is read)."""
        return self._written(relpath).size

    def _written(self, relpath: str) -> FileEntry:
        entry = self.files.get(relpath)
        if entry is None:
            raise ArtifactError(f"{self.file_uri(relpath)} was not written by this writer; it cannot be read back")
        return entry

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
        self.files[relpath] = hashing.entry()

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
        self.files[relpath] = _entry_of(fs, final)

    def commit(self, metrics: Mapping[str, Any] | None = None) -> Manifest:
        """Write `_MANIFEST.json` last: from now on the artifact exists for every reader."""
        draft = Manifest(
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
            manifest_sha256="",
        )
        fields = json.loads(draft.model_dump_json())  # exactly what readers will parse (NaN -> null)
        fields["manifest_sha256"] = manifest_digest(fields)
        manifest = Manifest.model_validate(fields)
        body = json.dumps(fields, indent=2).encode("utf-8")
        final = self.store.path(self.stage, self.key, MANIFEST_NAME)
        tmp = f"{final}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
        self.store.fs.makedirs(self.store.path(self.stage, self.key), exist_ok=True)  # an artifact may have no files
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


@overload
def _read_verified(
    store: ArtifactStore, stage: str, key: str, relpath: str, entry: FileEntry, mapped: Literal[False] = False
) -> bytes: ...
@overload
def _read_verified(
    store: ArtifactStore, stage: str, key: str, relpath: str, entry: FileEntry, mapped: Literal[True]
) -> memoryview: ...
def _read_verified(
    store: ArtifactStore, stage: str, key: str, relpath: str, entry: FileEntry, mapped: bool = False
) -> bytes | memoryview:
    """Read a whole file once; refuse it unless its size and digest (xxh3-128, or sha256 for entries
    without one) are the recorded ones. mapped: a local file is mapped read-only instead of copied (a
    fresh multi-megabyte copy costs more than hashing it); other stores read it."""
    path = store.path(stage, key, relpath)
    data: bytes | memoryview
    try:
        if mapped and isinstance(store.fs, LocalFileSystem) and entry.size > 0:
            with open(path, "rb") as raw:  # the mapping outlives the descriptor
                data = memoryview(mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ))
        else:
            with store.reachable(), store.fs.open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        problem = "is listed in the manifest but missing"
    else:
        if len(data) != entry.size:
            problem = f"has {len(data)} bytes, the manifest says {entry.size}"
        elif entry.xxh3_128 is not None:
            if xxhash.xxh3_128_hexdigest(data) == entry.xxh3_128:
                return data
            problem = "does not match its xxh3-128 digest in the manifest (corrupted)"
        elif hashlib.sha256(data).hexdigest() == entry.sha256:
            return data
        else:
            problem = "does not match its sha256 in the manifest (corrupted)"
    raise ArtifactCorruptError(f"{store.uri(stage, key, relpath)} {problem}; {recompute_hint(store.uri(stage, key))}")


def _entry_of(fs: AbstractFileSystem, path: str) -> FileEntry:
    """Size and both digests of a published file, read once."""
    sha, xxh, size = hashlib.sha256(), xxhash.xxh3_128(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            xxh.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, sha256=sha.hexdigest(), xxh3_128=xxh.hexdigest())


def _sha256_of(fs: AbstractFileSystem, path: str) -> str:
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()
