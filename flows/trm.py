"""Stage 2 model flow: the TRM on the compressed pairs, beside baselines."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, through_pairs
from llm_trm_core.config import PipelineConfig
from tasks.logs import core_logs_to_prefect
from tasks.trm import trm_task


@flow(name="trm")
def trm_flow(cfg: PipelineConfig) -> Manifests:
    """Everything the pairs depend on (cached), then the TRM and its baseline report."""
    with core_logs_to_prefect():
        out = through_pairs(cfg)
        out["trm"] = trm_task(cfg, out["pairs"], out["compressor-1b"])
    return out
