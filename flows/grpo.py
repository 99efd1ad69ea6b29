"""Stage 3 flow: evaluation before GRPO, GRPO on answer correctness, evaluation after (same problems)."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from tasks.attempts import flow_guard


@flow(name="grpo")
def grpo_flow(cfg: PipelineConfig) -> Manifests:
    """Everything up to the latent policy (cached), evaluation before, GRPO, evaluation after."""
    with flow_guard(cfg, "grpo"):
        return graph.through_grpo(prefect_call, cfg)
