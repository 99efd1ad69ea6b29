"""Stage 2 model flow: the TRM on the compressed pairs, beside baselines."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from tasks.attempts import flow_guard


@flow(name="trm")
def trm_flow(cfg: PipelineConfig) -> Manifests:
    """Everything the pairs depend on (cached), then the TRM and its baseline report."""
    with flow_guard(cfg, "trm"):
        return graph.through_trm(prefect_call, cfg)
