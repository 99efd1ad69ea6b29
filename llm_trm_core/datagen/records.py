"""Parquet schemas of the datagen stage: one row per problem (failures included) and the uncompressed
(pre, post) states of the successful ones. Parts are named by their problem-index range so a shard
can resume at its last processed index: `rows/part-000016-000024.parquet`."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from llm_trm_core.arrow import (
    FLOAT_DTYPES,
    pair_schema,
    schema_dtype,
    sequence_array,
    sequence_rows,
    vector_array,
    vector_rows,
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


def table_to_pairs(table: pa.Table) -> Iterator[PairStates]:
    """Inverse of `pairs_to_table`: float32 tensors that are zero-copy views into the table's buffers (one
    float buffer per chunk for pre, one for post); no per-row conversion."""
    dtype, dim = schema_dtype(table.schema), pairs_dim(table.schema)
    for chunk in table.to_batches():
        ids, splits = chunk.column("id").to_pylist(), chunk.column("split").to_pylist()
        posts = vector_rows(chunk.column("post"), dim).unbind(0)  # views, made in one call
        flat, offsets = sequence_rows(chunk.column("pre"), dim, dtype)
        pres = flat.split(np.diff(offsets).tolist())
        yield from map(PairStates, ids, splits, pres, posts)
