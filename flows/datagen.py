"""Stage 2 data flows: thinking generation, and the compressed pairs."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from tasks.attempts import flow_guard


@flow(name="datagen")
def datagen_flow(cfg: PipelineConfig) -> Manifests:
    """Generate thinking traces for `datagen.num_problems` problems, shard by shard (resumable)."""
    with flow_guard(cfg, "datagen"):
        return graph.datagen(prefect_call, cfg)


@flow(name="pairs")
def pairs_flow(cfg: PipelineConfig) -> Manifests:
    """Compressed (pre, post) pairs: everything they depend on runs first (cached)."""
    with flow_guard(cfg, "pairs"):
        return graph.through_pairs(prefect_call, cfg)
