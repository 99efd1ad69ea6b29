"""Stage 2 data: `pairs` (compressed training pairs for the TRM) and `trace-hiddens` (for compressor 1b).

`pairs`: every successful datagen row's (pre, post) states compressed to D' by a compressor
artifact, written as Parquet shards per split with an explicit schema:

    id: string, split: string, pre_len: int32,
    pre: binary (pre_len x D' little-endian float{16,32}, row-major), post: fixed_size_binary (D' floats)
    schema metadata: schema name/version, model, revision, layer, D, D', compressor key, datagen key,
    dtype, dim, pre_positions
    uncompressed, page checksums (llm_trm_core.arrow: the vector format)

Readable by `pyarrow.dataset` and `datasets.load_dataset("parquet", data_files=..., streaming=True)`; a
vector is `numpy.frombuffer(value, "<f4")` (float32) and pre reshapes to (pre_len, D').

`trace-hiddens`: the LM's token states over prompt + trace of every successful row (the system-prompt
prefix is context only), in the hidden-states format compressor 1b trains on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llm_trm_core.arrow import STATE_WRITE_OPTIONS, schema_dtype
from llm_trm_core.compressor.artifacts import load_compressor
from llm_trm_core.config import PipelineConfig
from llm_trm_core.datagen.artifacts import iter_pair_states, iter_rows, shard_manifests
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import pairs_dim, pairs_to_table
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import TextChunk
from llm_trm_core.lm import shared_language_model
from llm_trm_core.stages.publish import StateUnits, cached, stage_writer, write_states_artifact
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.trm.pairs import META_FILE, PAIRS_STAGE, SCHEMA_NAME, SCHEMA_VERSION, pairs_schema

logger = logging.getLogger(__name__)

STAGE = PAIRS_STAGE


def _table(pairs: list[PairStates], schema: pa.Schema) -> pa.Table:
    return pairs_to_table(pairs, pairs_dim(schema), schema_dtype(schema), schema=schema)


def _datagen_context(store: ArtifactStore, datagen: Manifest) -> tuple[dict[str, Any], Any, dict[str, int]]:
    """(model info, layer, system_prefix_len by id) of a datagen artifact."""
    shards = shard_manifests(store, datagen)
    if not shards:
        raise UserError(f"the datagen artifact {datagen.uri} has no shards")
    layer = shards[0].config["compressor.layer"]
    prefix = {row["id"]: int(row["system_prefix_len"]) for row in iter_rows(store, datagen) if row["failure"] is None}
    return dict(shards[0].metrics["model"]), layer, prefix


def run_pairs(cfg: PipelineConfig, store: ArtifactStore, datagen: Manifest, compressor: Manifest) -> Manifest:
    upstream = {"datagen": datagen.key, "compressor": compressor.key}
    key, manifest = cached(cfg, store, STAGE, upstream)
    if manifest is not None:
        return manifest
    start = time.perf_counter()
    model_info, layer, prefix = _datagen_context(store, datagen)
    hidden_size = int(model_info["hidden_size"])
    model = load_compressor(store, compressor)
    if model.hidden_size != hidden_size:
        raise UserError(
            f"the compressor {compressor.uri} maps D={model.hidden_size}, but the datagen states have D={hidden_size}: "
            "they come from different language models. Train the compressor on this model's hidden states."
        )
    compressor_layer = compressor.config.get("compressor", {}).get("layer", layer)
    if compressor_layer != layer:
        raise UserError(
            f"the compressor was fitted on layer {compressor_layer} but the datagen states are from layer {layer}; "
            "use the same compressor.layer for both"
        )
    p = cfg.pairs
    metadata = {
        "model": str(model_info["name"]),
        "revision": str(model_info.get("revision")),
        "layer": str(layer),
        "hidden_size": str(hidden_size),
        "d_prime": str(model.d_prime),
        "compressor_key": compressor.key,
        "datagen_key": datagen.key,
        "pre_positions": p.pre_positions,
    }
    schema = pairs_schema(model.d_prime, p.dtype, metadata)
    buffers: dict[str, list[PairStates]] = {}
    files: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    pre_lengths: list[int] = []
    with stage_writer(cfg, store, STAGE, key, upstream) as w:

        def flush(split: str) -> None:
            name = f"shards/{split}/part-{len(files.setdefault(split, [])):05d}.parquet"
            with w.open(name) as f:
                pq.write_table(_table(buffers[split], schema), f, **STATE_WRITE_OPTIONS)
            files[split].append(name)
            buffers[split] = []

        with torch.no_grad():
            for pair in iter_pair_states(store, datagen):
                pre = pair.pre[prefix[pair.id] :] if p.pre_positions == "no_system_prefix" else pair.pre
                compressed = PairStates(pair.id, pair.split, model.compress(pre), model.compress(pair.post))
                buffers.setdefault(pair.split, []).append(compressed)
                counts[pair.split] = counts.get(pair.split, 0) + 1
                pre_lengths.append(pre.shape[0])
                if len(buffers[pair.split]) >= p.rows_per_shard:
                    flush(pair.split)
        for split in list(buffers):
            if buffers[split]:
                flush(split)
        if not counts:
            raise UserError(
                f"the datagen artifact {datagen.uri} has no successful generations to make pairs from; see its "
                "report for the failure reasons"
            )
        meta = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **metadata, "dtype": p.dtype,
                "files": files, "pairs": counts}  # fmt: skip
        w.write_json(META_FILE, meta)
        return w.commit(
            {
                **{f"pairs_{split}": n for split, n in sorted(counts.items())},
                "d_prime": model.d_prime,
                "hidden_size": hidden_size,
                "pre_len_mean": float(np.mean(pre_lengths)),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )


def run_trace_hiddens(cfg: PipelineConfig, store: ArtifactStore, datagen: Manifest) -> Manifest:
    """Token states of prompt + thinking trace of every successful generation (compressor 1b's data)."""
    stage = "trace-hiddens"
    upstream = {"datagen": datagen.key}
    key, manifest = cached(cfg, store, stage, upstream)
    if manifest is not None:
        return manifest
    chunks = [
        TextChunk(
            row["id"], row["split"], list(row["prompt_ids"]) + list(row["trace_ids"]), int(row["system_prefix_len"])
        )
        for row in iter_rows(store, datagen)
        if row["failure"] is None
    ]
    if not chunks:
        raise UserError(
            f"the datagen artifact {datagen.uri} has no successful generations: no traces for compressor 1b"
        )
    lm = shared_language_model(cfg.model, cfg.runtime)
    units = StateUnits.of(cfg, store, stage, key, chunks)  # committed unit by unit: a preemption loses one unit
    return write_states_artifact(
        cfg, store, stage, key, lm, chunks, upstream=upstream, metrics={"traces": len(chunks)}, units=units
    )
