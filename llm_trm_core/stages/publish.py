"""What every stage does around its own computation, written once: find its committed artifact for a
config (`cached`), open the writer that commits a new one (`stage_writer`), and the hidden-states artifact
that both `hiddens` (text corpus) and `trace-hiddens` (thinking traces) write.

The corpus pass can be committed unit by unit (`StateUnits`): the chunks, in the order the LM runs them
(longest first), are cut into units of whole batches; each unit's states are committed as a checkpoint of
the artifact as soon as it is computed, a rerun (or another worker, `flows/fanout.py`) computes only the
units not committed, and the artifact is then written by replaying every unit in order: its files are
those of one uninterrupted pass, byte for byte (the same batches run the same sequences)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import (
    HEAD_STAGE,
    ShardedStatesWriter,
    TextChunk,
    cast_states,
    ensure_lm_head,
    extract_states,
    lm_head_of,
    resolve_layer,
)
from llm_trm_core.lm import LoadedLM
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, key_for, stage_config
from llm_trm_core.store import ArtifactStore, ArtifactWriter, Manifest
from llm_trm_core.training.checkpoints import CheckpointManager

logger = logging.getLogger(__name__)

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
    units: StateUnits | None = None,
) -> Manifest:
    """Run the LM over `chunks` and store the layer states of every kept position (train/val/test). With
    `units` (over the same chunks), the pass is committed unit by unit and resumes (module docstring)."""
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
    if units is not None:
        units.compute(lm, layer_index)
    with stage_writer(cfg, store, stage, key, upstream) as writer:
        shards = ShardedStatesWriter(writer, lm.info.hidden_size, c.cache_dtype, c.rows_per_shard)
        if units is not None:
            for chunk, array in units.replay():
                positions = np.arange(chunk.keep_from, len(chunk.input_ids))
                shards.add_array(chunk.split, chunk.doc_id, positions, array)
        else:
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


def state_order(chunks: list[TextChunk]) -> list[int]:
    """Chunk indexes in the order `extract_states` runs them: longest first, ties by index."""
    return sorted(range(len(chunks)), key=lambda i: (-len(chunks[i].input_ids), i))


def unit_bounds(sequences: int, batch_size: int, per_unit: int) -> list[tuple[int, int]]:
    """Positions [first, end) in the run order of each unit: whole batches of `batch_size`, about `per_unit`
    sequences each (rounded down to whole batches, at least one), so every unit runs the batches one pass runs."""
    size = max(1, per_unit // batch_size) * batch_size
    return [(a, min(a + size, sequences)) for a in range(0, sequences, size)]


@dataclass
class StateUnits:
    """The hidden-state pass over `chunks` cut into units, each committed as checkpoint step `unit + 1` of
    the artifact being written (`CheckpointManager(store, stage, key)`): a unit's state holds its chunk
    indexes and each one's kept states, already cast to the stored dtype."""

    cfg: PipelineConfig
    chunks: list[TextChunk]
    checkpoints: CheckpointManager

    def __post_init__(self) -> None:
        c = self.cfg.compressor
        self.order = state_order(self.chunks)
        self.bounds = unit_bounds(len(self.order), c.extract_batch_size, c.hidden_unit_sequences)

    @classmethod
    def of(cls, cfg: PipelineConfig, store: ArtifactStore, stage: str, key: str, chunks: list[TextChunk]) -> StateUnits:
        return cls(cfg, chunks, CheckpointManager(store, stage, key, keep_last=0))

    def members(self, unit: int) -> list[int]:
        first, end = self.bounds[unit]
        return self.order[first:end]

    def committed(self) -> set[int]:
        """Units whose checkpoint is complete and holds the chunks this plan gives them."""
        done = set()
        for step in self.checkpoints.complete_steps():
            unit = step - 1
            if 0 <= unit < len(self.bounds) and self.checkpoints.load(step).get("chunks") == self.members(unit):
                done.add(unit)
        return done

    def compute(self, lm: LoadedLM, layer_index: int, chosen: Iterable[int] | None = None) -> list[int]:
        """Run and commit every unit of `chosen` (default: all) not committed yet; returns the units run."""
        c = self.cfg.compressor
        wanted = range(len(self.bounds)) if chosen is None else chosen
        done = self.committed()
        todo = [u for u in wanted if u not in done]
        if done:
            logger.info("hidden states: %d of %d units committed already", len(done), len(self.bounds))
        pad_id = int(lm.tokenizer.pad_token_id or 0)
        for unit in todo:
            members = self.members(unit)
            states = []
            chunks = [self.chunks[i] for i in members]  # already in run order: extract_states keeps it
            for chunk, rows in extract_states(lm.model, chunks, layer_index, c.extract_batch_size, pad_id):
                kept = cast_states(chunk.doc_id, rows[chunk.keep_from :], lm.info.hidden_size, c.cache_dtype)
                states.append(torch.from_numpy(kept))
            self.checkpoints.save(unit + 1, {"chunks": members, "states": states})
            logger.info(
                "hidden states: unit %d of %d committed (%d sequences)", unit + 1, len(self.bounds), len(chunks)
            )
        return todo

    def replay(self) -> Iterable[tuple[TextChunk, np.ndarray]]:
        """Every chunk's committed states, in run order (one unit in memory at a time)."""
        for unit in range(len(self.bounds)):
            state = self.checkpoints.load(unit + 1)
            if state.get("chunks") != self.members(unit):
                raise UserError(
                    f"hidden-state unit {unit + 1} under {self.checkpoints.folder} holds other sequences than this "
                    "run plans; delete that folder to compute the hidden states again"
                )
            for i, states in zip(state["chunks"], state["states"], strict=True):
                yield self.chunks[i], states.numpy()
