"""Your own data files, local or remote (`gs://`, `memory://`, any fsspec URL): listing and row reading.

A path is a file, a folder (every supported file under it) or a glob (`data/*.jsonl`,
`gs://bucket/texts/**/*.txt`); matches are read in sorted order. Parquet is read column by column;
JSON Lines (one object per line) and text may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`: inferred from
the name). Every problem with a file is a `ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from llm_trm_core.errors import ConfigError

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
PARQUET = (".parquet", ".pq")
JSONL = (".jsonl", ".ndjson")
TEXT = (".txt", ".md")


@dataclass(frozen=True)
class DataFiles:
    fs: AbstractFileSystem
    paths: list[str]

    def name(self, path: str) -> str:
        """How a file is shown in messages: a local path as is, a remote one as its URL."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else self.fs.unstrip_protocol(path)


def fingerprint(files: DataFiles) -> list[list[Any]]:
    """What identifies the files' content without reading them: name, size and the store's content
    version (GCS md5 or generation, an ETag, else the modification time). Enters artifact keys, so an
    edited file under the same name recomputes what was built from it."""
    out: list[list[Any]] = []
    for path in files.paths:
        info = files.fs.info(path)
        version = next(
            (
                info[k]
                for k in ("md5Hash", "etag", "ETag", "generation", "mtime", "LastModified", "created")
                if info.get(k)
            ),
            None,
        )
        out.append([files.name(path), info.get("size"), str(version)])
    return out


def kind_of(path: str) -> str:
    """`parquet`, `jsonl`, `text` or `` (unsupported), from the file name (a compression suffix is skipped)."""
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    for kind, suffixes in (("parquet", PARQUET), ("jsonl", JSONL), ("text", TEXT)):
        if name.endswith(suffixes):
            return "" if kind == "parquet" and name != path.lower() else kind  # no compressed Parquet files
    return ""


def list_files(pattern: str, field: str, kinds: tuple[str, ...]) -> DataFiles:
    """The files `pattern` names (a file, a folder or a glob), sorted; a ConfigError when none can be read."""
    if not pattern:
        raise ConfigError(f"{field} is empty; set it to a file, a folder or a glob (e.g. {field}=data/*.jsonl)")
    fs, path = fsspec.core.url_to_fs(pattern)
    allowed = ", ".join(s for kind in kinds for s in {"parquet": PARQUET, "jsonl": JSONL, "text": TEXT}[kind])
    if any(ch in path for ch in "*?["):
        matches = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    elif fs.isdir(path):
        matches = sorted(p for p in fs.find(path) if kind_of(p) in kinds and not p.rsplit("/", 1)[-1].startswith("."))
    elif fs.exists(path):
        matches = [path]
    else:
        raise ConfigError(f"{field}={pattern!r}: no such file or folder; point {field} at your data ({allowed})")
    if not matches:
        raise ConfigError(f"{field}={pattern!r} matches no files; point {field} at your data ({allowed})")
    files = DataFiles(fs, matches)
    for p in matches:
        if kind_of(p) not in kinds:
            raise ConfigError(
                f"{field}: {files.name(p)} is not a supported file; use {allowed} files "
                "(JSON Lines and text may be compressed) or narrow the glob"
            )
    return files


def parquet_columns(files: DataFiles, path: str) -> list[str]:
    with files.fs.open(path, "rb") as f:
        try:
            return list(pq.ParquetFile(f).schema_arrow.names)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise ConfigError(
                f"{files.name(path)} is not a readable Parquet file ({exc}); rewrite or remove it"
            ) from None


def read_parquet(files: DataFiles, path: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    with files.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns)).to_pylist()


def iter_jsonl(files: DataFiles, path: str) -> Iterator[dict[str, Any]]:
    """One object per non-blank line; a line that is not a JSON object is a ConfigError naming its number."""
    with files.fs.open(path, "rb", compression="infer") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{files.name(path)} line {number} is not valid JSON ({exc.msg}); "
                    "a JSON Lines file holds one object per line"
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(f"{files.name(path)} line {number} is not a JSON object; write one object per line")
            yield row


def read_text(files: DataFiles, path: str) -> str:
    with files.fs.open(path, "rb", compression="infer") as f:
        data = f.read()
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{files.name(path)} is not UTF-8 text ({exc}); convert it to UTF-8") from None
