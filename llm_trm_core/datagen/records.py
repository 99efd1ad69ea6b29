"""Parquet schemas of the datagen stage: one row per problem (failures included) and the uncompressed
(pre, post) states of the successful ones. Parts are named by their problem-index range so a shard
can resume at its last processed index: `rows/part-000016-000024.parquet`."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from llm_trm_core.arrow import (
    FLOAT_DTYPES,
    column_rows,
    pair_schema,
    schema_dtype,
    sequence_array,
    sequence_rows,
    vector_array,
)
from llm_trm_core.datagen.generate import PairStates

ROWS_SCHEMA_NAME = "llm-trm/datagen-rows"
STATES_SCHEMA_NAME = "llm-trm/datagen-states"
SCHEMA_VERSION = "1"  # the rows table
STATES_SCHEMA_VERSION = "2"  # 2: vectors as fixed_size_binary / binary, uncompressed (llm_trm_core.arrow)
PART_RE = re.compile(r"part-(\d{6})-(\d{6})\.parquet$")
ROWS_SCHEMA = pa.schema(
    [
        pa.field("problem_index", pa.int32(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("gold_answer_text", pa.string(), nullable=False),
        pa.field("gold_value", pa.float64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("system_prefix_len", pa.int32(), nullable=False),
        pa.field("think_start", pa.int32(), nullable=False),
        pa.field("generated_text", pa.string(), nullable=False),
        pa.field("trace_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("answer_text", pa.string(), nullable=False),
        pa.field("answer_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("think_end", pa.int32()),
        pa.field("think_tokens", pa.int32()),
        pa.field("end_source", pa.string()),
        pa.field("extracted_answer", pa.float64()),
        pa.field("extract_method", pa.string()),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("correct_strict", pa.bool_(), nullable=False),
        pa.field("failure", pa.string()),
    ],
    metadata={"schema": ROWS_SCHEMA_NAME, "schema_version": SCHEMA_VERSION},
)


def part_name(folder: str, start: int, end: int) -> str:
    return f"{folder}/part-{start:06d}-{end:06d}.parquet"


def parse_part(name: str) -> tuple[int, int] | None:
    match = PART_RE.search(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def rows_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=ROWS_SCHEMA)


def states_schema(hidden_size: int, dtype: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    return pair_schema(hidden_size, dtype, STATES_SCHEMA_NAME, STATES_SCHEMA_VERSION, metadata)


def pairs_to_table(
    pairs: Sequence[PairStates],
    hidden_size: int,
    dtype: str,
    metadata: dict[str, str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """(pre sequence, post vector) rows: pre is one binary value of pre_len vectors, post one vector."""
    np_dtype = FLOAT_DTYPES[dtype]
    schema = schema or states_schema(hidden_size, dtype, metadata)
    if not pairs:
        return schema.empty_table()
    pre, lengths = sequence_array([p.pre.numpy().astype(np_dtype, copy=False) for p in pairs], dtype, hidden_size)
    post = vector_array(np.stack([p.post.numpy().astype(np_dtype, copy=False) for p in pairs]), dtype, hidden_size)
    ids = pa.array([p.id for p in pairs], pa.string())
    splits = pa.array([p.split for p in pairs], pa.string())
    return pa.Table.from_arrays([ids, splits, pa.array(lengths), pre, post], schema=schema)


def pairs_dim(schema: pa.Schema) -> int:
    """D of a pairs/states table: the width of its post vectors."""
    return int(schema.field("post").type.byte_width // FLOAT_DTYPES[schema_dtype(schema)].itemsize)


@dataclass(frozen=True)
class PairColumns:
    """The pairs of one table as flat columns: pair i's pre is rows[starts[i]:starts[i + 1]], its post
    post[i]. For float32 tables, rows and post are zero-copy views of the table's buffers."""

    ids: list[str]
    splits: list[str]
    rows: torch.Tensor  # (total pre positions, D) float32
    starts: torch.Tensor  # (n + 1,) int64 row offsets
    post: torch.Tensor  # (n, D) float32

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def d(self) -> int:
        return int(self.post.shape[1])

    @functools.cached_property
    def pres(self) -> tuple[torch.Tensor, ...]:
        """Each pair's pre rows, as views (made in one call, on first use)."""
        return self.rows.split(torch.diff(self.starts).tolist())

    def pairs(self) -> Iterator[PairStates]:
        """One PairStates per pair, its tensors views of these columns."""
        return map(PairStates, self.ids, self.splits, self.pres, self.post.unbind(0))


def table_to_columns(table: pa.Table) -> PairColumns:
    """Inverse of `pairs_to_table`, as flat columns: zero-copy views of the float buffers, no per-row work.
    A table of several chunks (row groups) is first combined into one, which copies once."""
    dtype, dim = schema_dtype(table.schema), pairs_dim(table.schema)
    if table.column("pre").num_chunks != 1:  # several row groups (or none): one copy into one chunk
        table = table.combine_chunks()
    pre = table.column("pre")
    rows, starts = sequence_rows(pre.chunks[0] if pre.num_chunks else pa.array([], pa.binary()), dim, dtype)
    return PairColumns(
        table.column("id").to_pylist(),
        table.column("split").to_pylist(),
        rows,
        torch.from_numpy(starts),
        column_rows(table.column("post"), dim),
    )


def table_to_pairs(table: pa.Table) -> Iterator[PairStates]:
    """Inverse of `pairs_to_table`: float32 tensors that are zero-copy views into the table's buffers."""
    return table_to_columns(table).pairs()
