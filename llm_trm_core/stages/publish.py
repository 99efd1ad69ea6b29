"""What every stage does around its own computation, written once: find its committed artifact for a
config (`cached`), open the writer that commits a new one (`stage_writer`), and the hidden-states artifact
that both `hiddens` (text corpus) and `trace-hiddens` (thinking traces) write."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import (
    HEAD_STAGE,
    ShardedStatesWriter,
    TextChunk,
    ensure_lm_head,
    extract_states,
    lm_head_of,
    resolve_layer,
)
from llm_trm_core.lm import LoadedLM
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, key_for, stage_config
from llm_trm_core.store import ArtifactStore, ArtifactWriter, Manifest

REQUIRED_SPLITS = ("train", "val", "test")


def cached(
    cfg: PipelineConfig,
    store: ArtifactStore,
    stage: str,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, Manifest | None]:
    """The stage's key for this config and upstream, and its committed manifest (None: not computed yet)."""
    key = key_for(cfg, stage, upstream, extra)
    return key, store.read_manifest(stage, key)


def stage_writer(
    cfg: PipelineConfig,
    store: ArtifactStore,
    stage: str,
    key: str,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ArtifactWriter:
    """The writer of the stage's artifact under `key`, its manifest carrying the stage's config view and code
    version (the same `extra` as the key)."""
    return store.writer(
        stage, key, config=stage_config(cfg, stage, extra), code_version=STAGE_CODE_VERSIONS[stage], upstream=upstream
    )


def write_states_artifact(
    cfg: PipelineConfig,
    store: ArtifactStore,
    stage: str,
    key: str,
    lm: LoadedLM,
    chunks: list[TextChunk],
    *,
    upstream: dict[str, str] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Run the LM over `chunks` and store the layer states of every kept position (train/val/test)."""
    start = time.perf_counter()
    layer_index = resolve_layer(cfg.compressor.layer, lm.info.num_layers)
    present = {c.split for c in chunks}
    missing = [s for s in REQUIRED_SPLITS if s not in present]
    if missing:
        raise UserError(
            f"{stage}: no {'/'.join(missing)} data among {len(chunks)} sequences; every split needs some (raise "
            "corpus.num_documents / corpus.heldout_fraction, or datagen.num_problems)"
        )
    c = cfg.compressor
    with stage_writer(cfg, store, stage, key, upstream) as writer:
        shards = ShardedStatesWriter(writer, lm.info.hidden_size, c.cache_dtype, c.rows_per_shard)
        pad_id = int(lm.tokenizer.pad_token_id or 0)
        for chunk, states in extract_states(lm.model, chunks, layer_index, c.extract_batch_size, pad_id):
            positions = np.arange(chunk.keep_from, len(chunk.input_ids))
            shards.add(chunk.split, chunk.doc_id, positions, states[chunk.keep_from :])
        head = ensure_lm_head(  # once per model and layer, not a copy in every hidden-states artifact
            store,
            key_for(cfg, HEAD_STAGE),
            lm_head_of(lm.model, layer_index, lm.info.num_layers),
            next(lm.model.parameters()).dtype,
        )
        meta = shards.close({"layer": c.layer, "layer_index": layer_index, "model": lm.info.as_dict(), "lm_head": head})
        return writer.commit(
            {
                **(metrics or {}),
                "sequences": len(chunks),
                **{f"tokens_{split}": n for split, n in sorted(meta["tokens"].items())},
                "hidden_size": lm.info.hidden_size,
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
