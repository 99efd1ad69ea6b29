"""Stage 2 data flows: thinking generation, and the compressed pairs."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, stage2_data, through_pairs
from llm_trm_core.config import PipelineConfig
from tasks.attempts import flow_guard
from tasks.caching import cached
from tasks.problems import problems_task


@flow(name="datagen")
def datagen_flow(cfg: PipelineConfig) -> Manifests:
    """Generate thinking traces for `datagen.num_problems` problems, shard by shard (resumable)."""
    with flow_guard(cfg, "datagen"):
        problems = cached(problems_task, cfg)(cfg)
        return {"problems": problems, "datagen": stage2_data(cfg, problems)}


@flow(name="pairs")
def pairs_flow(cfg: PipelineConfig) -> Manifests:
    """Compressed (pre, post) pairs: everything they depend on runs first (cached)."""
    with flow_guard(cfg, "pairs"):
        return through_pairs(cfg)
