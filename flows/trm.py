"""Stage 2 model flow: the TRM on the compressed pairs, beside baselines."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, through_pairs
from llm_trm_core.config import PipelineConfig
from tasks.attempts import flow_guard
from tasks.caching import cached
from tasks.trm import trm_task


@flow(name="trm")
def trm_flow(cfg: PipelineConfig) -> Manifests:
    """Everything the pairs depend on (cached), then the TRM and its baseline report."""
    with flow_guard(cfg, "trm"):
        out = through_pairs(cfg)
        out["trm"] = cached(trm_task, cfg)(cfg, out["pairs"], out["compressor-1b"])
    return out
