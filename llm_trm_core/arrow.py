"""Arrow helpers for hidden-state columns (fixed-size float lists and sequences of them), and Parquet
reading and writing for artifacts.

Every Parquet file is written with page checksums (CRC32 of each data and dictionary page, as stored)
and read through `read_parquet`: the whole file is read once and checked against the manifest's sha256
(llm_trm_core.store), so the footer (schema, row groups, key-value metadata), page headers and pages are
all covered before anything is parsed; the page checksums are verified as the pages are decoded on top of
that. They also make a shard self-checking for any Parquet reader outside the store, and catch a page that
was corrupted before a resumed writer adopted the file (its sha256 is then taken from the bad bytes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_trm_core.errors import ArtifactCorruptError
from llm_trm_core.store import recompute_hint

if TYPE_CHECKING:
    import torch

    from llm_trm_core.store import Artifact, ArtifactWriter

FLOAT_TYPES = {"float32": pa.float32(), "float16": pa.float16()}

# Tables of scalars (problems, generation rows).
TABLE_WRITE_OPTIONS: dict[str, Any] = {"compression": "zstd", "write_page_checksum": True}

# Float columns get neither dictionary encoding nor min/max statistics (useless for them, and 2-3x slower).
STATE_WRITE_OPTIONS: dict[str, Any] = {
    "use_dictionary": ["id", "split", "doc_id"],
    "write_statistics": ["id", "split", "doc_id", "pre_len", "position"],
    "compression": "zstd",
    "write_page_checksum": True,
}


def read_parquet(source: Artifact | ArtifactWriter, relpath: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file of a committed artifact (or one its writer wrote), verified before it is parsed."""
    data = source.read_bytes(relpath)  # size + sha256 against the manifest: every byte of the file
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:  # a page checksum mismatch is an OSError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactCorruptError(
            f"{source.file_uri(relpath)} is not a valid Parquet file ({first}); {recompute_hint(source.uri)}"
        ) from exc


def pair_schema(dim: int, dtype: str, name: str, version: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    """id, split, pre_len, pre: list<fixed_size_list<float>[dim]>, post: fixed_size_list<float>[dim]."""
    vector = pa.list_(pa.field("element", FLOAT_TYPES[dtype], nullable=False), dim)
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("pre_len", pa.int32(), nullable=False),
            pa.field("pre", pa.list_(pa.field("position", vector, nullable=False)), nullable=False),
            pa.field("post", vector, nullable=False),
        ],
        metadata={"schema": name, "schema_version": version, "dtype": dtype, **(metadata or {})},
    )


def vector_array(flat: np.ndarray, dtype: str, dim: int) -> pa.FixedSizeListArray:
    """(n*dim,) or (n, dim) numpy -> fixed_size_list<float>[dim] (no copy for float32 input)."""
    element = pa.field("element", FLOAT_TYPES[dtype], nullable=False)
    return pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1), type=FLOAT_TYPES[dtype]), type=pa.list_(element, dim)
    )


def sequence_array(arrays: Sequence[np.ndarray], dtype: str, dim: int) -> tuple[pa.ListArray, np.ndarray]:
    """A list of (L_i, dim) arrays -> list<fixed_size_list<float>[dim]> and the lengths."""
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate(arrays) if arrays else np.zeros((0, dim), dtype=np.float32)
    values = vector_array(flat, dtype, dim)
    list_type = pa.list_(pa.field("position", values.type, nullable=False))
    return pa.ListArray.from_arrays(offsets, values, type=list_type), lengths


def vector_rows(vectors: pa.Array, dim: int) -> torch.Tensor:
    """A fixed_size_list<float>[dim] array -> a float32 (n, dim) tensor.

    float32 without nulls (what the writers produce) is a zero-copy view of the Arrow buffer: no copy and
    no per-row work. The tensor shares Arrow's memory (kept alive by the view), which nothing else holds;
    float16 is converted once."""
    import torch  # here, not at module import: the CLI's preflight runs before torch loads

    flat = vectors.flatten()  # the child floats of this slice (zero-copy, respects the array's offset)
    if flat.type == pa.float32() and flat.null_count == 0:
        array = flat.to_numpy(zero_copy_only=True)
    else:
        array = flat.to_numpy(zero_copy_only=False).astype(np.float32)
    with warnings.catch_warnings():  # Arrow buffers are read-only to NumPy; the tensor is their only user
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).view(-1, dim)


def column_rows(column: pa.ChunkedArray, dim: int) -> torch.Tensor:
    """A fixed_size_list<float>[dim] column -> float32 (n, dim): a view for one chunk, one concatenation else."""
    import torch

    parts = [vector_rows(chunk, dim) for chunk in column.chunks]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dim)
