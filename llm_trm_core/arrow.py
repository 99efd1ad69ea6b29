"""Arrow helpers for hidden-state columns (fixed-width float vectors and sequences of them), and Parquet
reading and writing for artifacts.

Vector format (hidden-states shards, datagen states, pairs): a vector of D floats is one
`fixed_size_binary(D * itemsize)` value holding the little-endian floats (float32 or float16, named by the
schema's `dtype` metadata); a sequence of L vectors is one `binary` value of L * D floats, row-major. The
columns are written uncompressed: Parquet then stores each value's bytes as they are, so decoding a
column is one copy into an Arrow buffer, and the floats are handed to NumPy/torch as a view of that
buffer (no per-value work, no second copy). A list<float> column instead decodes a repetition and a
definition level per float, and zstd saves under 10% on float32 states (docs/performance.md).

Every Parquet file is written with page checksums (CRC32 of each data and dictionary page, as stored)
and read through `read_parquet`: the whole file is read once and checked against the manifest's digest
(llm_trm_core.store: xxh3-128, sha256 for manifests that predate it), so the footer (schema, row groups,
key-value metadata), page headers and pages are all covered before anything is parsed. Small tables also
verify the page checksums as they decode; vector shards (`page_checksums=False`) skip them, since the
whole-file digest already covers every page and CRC32 would cost more than the decoding. A page corrupted
before a resumed writer adopted its file (its digest is then taken from the bad bytes) is caught at
adoption instead (`adopt_parquet`). The page checksums also make a shard self-checking for any Parquet
reader outside the store.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_trm_core.errors import ArtifactCorruptError
from llm_trm_core.store import recompute_hint

if TYPE_CHECKING:
    import torch

    from llm_trm_core.store import Artifact, ArtifactWriter

# Stored float types: little-endian, whatever the machine.
FLOAT_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

# Tables of scalars (problems, generation rows).
TABLE_WRITE_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_page_checksum": True}

# Vector shards: no compression (module docstring); float columns get neither dictionary encoding nor
# min/max statistics (useless for them, and slower).
STATE_WRITE_OPTIONS: dict[str, Any] = {
    "use_dictionary": ["id", "split", "doc_id"],
    "write_statistics": ["id", "split", "doc_id", "pre_len", "position"],
    "compression": "none",
    "write_page_checksum": True,
}


def _corrupt(source: Artifact | ArtifactWriter, relpath: str, exc: Exception) -> ArtifactCorruptError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ArtifactCorruptError(
        f"{source.file_uri(relpath)} is not a valid Parquet file ({first}); {recompute_hint(source.uri)}"
    )


def read_parquet(
    source: Artifact | ArtifactWriter,
    relpath: str,
    columns: list[str] | None = None,
    *,
    page_checksums: bool = True,
) -> pa.Table:
    """A Parquet file of a committed artifact (or one its writer wrote), verified before it is parsed.

    page_checksums=False skips the pages' CRC32 (vector shards: the whole-file digest covers them)."""
    data = source.read_buffer(relpath)  # size + digest against the manifest: every byte of the file
    return _parse(source, relpath, data, columns, page_checksums)


# Files are read ahead on a helper thread only from this size: for smaller files the handoffs between the two
# threads cost more than the overlapped digest and mapping save (bench.shard_io; docs/performance.md).
READ_AHEAD_MIN_BYTES = 4 << 20


def iter_parquet(
    source: Artifact | ArtifactWriter,
    relpaths: Sequence[str],
    columns: list[str] | None = None,
    *,
    page_checksums: bool = True,
    read_ahead_from: int = READ_AHEAD_MIN_BYTES,
) -> Iterator[pa.Table]:
    """`read_parquet` of each file in turn. When a file after the first is at least `read_ahead_from` bytes,
    the files are read one ahead: while the caller works on a file, the next one is read and checked against
    its digest on a helper thread (the hash and the page faults of mapping the file run there, outside the
    GIL). Otherwise each file is read on the caller's thread when the caller reaches it. A file is parsed
    only once verified, on the caller's thread, as in `read_parquet`; an error reading a file is raised when
    the caller reaches that file. Memory: the file in use plus, when reading ahead, the next one's bytes."""
    if not relpaths:
        return
    if not any(source.size(relpath) >= read_ahead_from for relpath in relpaths[1:]):
        for relpath in relpaths:
            table = read_parquet(source, relpath, columns, page_checksums=page_checksums)
            yield table
            del table  # before the next file is parsed (the caller has let go of it too)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        ahead: Future[memoryview] = pool.submit(source.read_buffer, relpaths[0])
        for i, relpath in enumerate(relpaths):
            data = ahead.result()
            if i + 1 < len(relpaths):
                ahead = pool.submit(source.read_buffer, relpaths[i + 1])
            table = _parse(source, relpath, data, columns, page_checksums)
            del data  # the table holds copies: the mapping can go before the caller works on the table
            yield table
            del table  # before the next file is parsed (the caller has let go of it too)


def _parse(
    source: Artifact | ArtifactWriter, relpath: str, data: memoryview, columns: list[str] | None, page_checksums: bool
) -> pa.Table:
    try:  # decoding copies what the table keeps: nothing refers to the (mapped) file afterwards
        # ParquetFile.read on one thread: half the fixed cost of pq.read_table (its dataset layer) on a few MB
        parquet = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)), page_checksum_verification=page_checksums)
        return parquet.read(columns=columns, use_threads=False)
    except (OSError, pa.ArrowException) as exc:  # a page checksum mismatch is an OSError
        raise _corrupt(source, relpath, exc) from exc


def adopt_parquet(writer: ArtifactWriter, relpath: str) -> None:
    """Adopt a Parquet file an interrupted attempt published (`ArtifactWriter.adopt`), once its page
    checksums are verified: its digest is taken from the bytes as they are, so a page corrupted since it
    was written is caught here or never."""
    fs = writer.store.fs
    try:
        with fs.open(writer.final_path(relpath), "rb") as f:
            pq.read_table(pa.BufferReader(f.read()), page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise _corrupt(writer, relpath, exc) from exc
    writer.adopt(relpath)


def vector_type(dim: int, dtype: str) -> pa.DataType:
    """One stored vector: fixed_size_binary of `dim` little-endian floats of `dtype`."""
    return pa.binary(dim * FLOAT_DTYPES[dtype].itemsize)


def pair_schema(dim: int, dtype: str, name: str, version: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    """id, split, pre_len, pre: binary (pre_len x dim floats), post: fixed_size_binary (dim floats)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("pre_len", pa.int32(), nullable=False),
            pa.field("pre", pa.binary(), nullable=False),
            pa.field("post", vector_type(dim, dtype), nullable=False),
        ],
        metadata={"schema": name, "schema_version": version, "dtype": dtype, "dim": str(dim), **(metadata or {})},
    )


def schema_dtype(schema: pa.Schema) -> str:
    """The stored float type a vector schema names in its `dtype` metadata."""
    dtype = (schema.metadata or {}).get(b"dtype", b"").decode()
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"schema has no float dtype metadata (got {dtype!r}); expected one of {sorted(FLOAT_DTYPES)}")
    return dtype


def vector_array(flat: np.ndarray, dtype: str, dim: int) -> pa.FixedSizeBinaryArray:
    """(n*dim,) or (n, dim) numpy -> fixed_size_binary vectors (no copy for contiguous input of `dtype`)."""
    array = np.ascontiguousarray(flat, dtype=FLOAT_DTYPES[dtype]).reshape(-1)
    if array.size % dim:
        raise ValueError(f"{array.size} floats are not a whole number of {dim}-vectors")
    return pa.FixedSizeBinaryArray.from_buffers(vector_type(dim, dtype), array.size // dim, [None, pa.py_buffer(array)])


def sequence_array(arrays: Sequence[np.ndarray], dtype: str, dim: int) -> tuple[pa.BinaryArray, np.ndarray]:
    """A list of (L_i, dim) arrays -> one binary value of L_i * dim floats each, and the lengths L_i."""
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    np_dtype = FLOAT_DTYPES[dtype]
    offsets = np.concatenate([[0], np.cumsum(lengths)]) * (dim * np_dtype.itemsize)
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of sequences in one table; write fewer rows per shard")
    flat = np.concatenate(arrays) if arrays else np.zeros((0, dim))
    data = np.ascontiguousarray(flat, dtype=np_dtype)
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    return pa.BinaryArray.from_buffers(pa.binary(), len(arrays), buffers), lengths.astype(np.int32)


def _as_tensor(array: np.ndarray, dim: int) -> torch.Tensor:
    """float32 (n, dim) tensor of a float view: the view itself for float32, one conversion for float16."""
    import torch  # here, not at module import: the CLI's preflight runs before torch loads

    if array.dtype != np.float32:
        array = array.astype(np.float32)
    with warnings.catch_warnings():  # Arrow buffers are read-only to NumPy; the tensor is their only user
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).view(-1, dim)


def vector_rows(vectors: pa.Array, dim: int) -> torch.Tensor:
    """fixed_size_binary vectors of `dim` floats -> a float32 (n, dim) tensor.

    float32 (what the writers produce by default) is a zero-copy view of the Arrow buffer: no copy and no
    per-row work; the tensor keeps the buffer alive. float16 is converted once."""
    if not pa.types.is_fixed_size_binary(vectors.type) or vectors.type.byte_width % dim:
        raise ValueError(f"expected fixed_size_binary vectors of {dim} floats, got {vectors.type}")
    if vectors.null_count:
        raise ValueError("vector columns hold no nulls")
    itemsize = vectors.type.byte_width // dim
    stored = [d for d in FLOAT_DTYPES.values() if d.itemsize == itemsize]
    if not stored:
        raise ValueError(f"{vectors.type} does not hold {dim} float16 or float32 values")
    dtype = stored[0]
    n, data = len(vectors), vectors.buffers()[1]
    if n == 0 or data is None:
        return _as_tensor(np.zeros((0, dim), dtype), dim)
    array = np.frombuffer(data, dtype, count=n * dim, offset=vectors.offset * vectors.type.byte_width)
    return _as_tensor(array, dim)


def sequence_rows(sequences: pa.Array, dim: int, dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """binary sequences of `dim`-vectors of `dtype` -> (the concatenated float32 (total, dim) rows, start
    offsets in rows: n + 1 of them). The rows are a zero-copy view of the Arrow buffer for float32."""
    if not pa.types.is_binary(sequences.type):
        raise ValueError(f"expected binary sequences, got {sequences.type}")
    np_dtype = FLOAT_DTYPES[dtype]
    row_bytes = dim * np_dtype.itemsize
    if len(sequences) == 0:
        return _as_tensor(np.zeros((0, dim), np_dtype), dim), np.zeros(1, np.int64)
    if sequences.null_count:
        raise ValueError("sequence columns hold no nulls")
    offsets = np.frombuffer(sequences.buffers()[1], np.int32, count=len(sequences) + 1, offset=sequences.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    if np.any((offsets - start) % row_bytes):
        raise ValueError(f"sequence values are not whole {dim}-vectors of {dtype}")
    data = sequences.buffers()[2]
    if end == start or data is None:
        array = np.zeros((0, dim), np_dtype)
    else:
        array = np.frombuffer(data, np_dtype, count=(end - start) // np_dtype.itemsize, offset=start)
    return _as_tensor(array, dim), ((offsets - start) // row_bytes).astype(np.int64)


def column_rows(column: pa.ChunkedArray, dim: int) -> torch.Tensor:
    """A vector column -> float32 (n, dim): a view for one chunk, one concatenation else."""
    import torch

    parts = [vector_rows(chunk, dim) for chunk in column.chunks]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dim)
