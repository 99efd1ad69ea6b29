"""Latent reasoning flows: train the injection of TRM output into the LM, and evaluate every arm."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from tasks.attempts import flow_guard


@flow(name="latent")
def latent_flow(cfg: PipelineConfig) -> Manifests:
    """Everything up to the TRM (cached), then the projection trained on answer likelihood."""
    with flow_guard(cfg, "latent"):
        return graph.through_latent(prefect_call, cfg)


@flow(name="evaluate")
def evaluate_flow(cfg: PipelineConfig) -> Manifests:
    """End-task accuracy of no-think, think, TRM-latent, random-latent and original-style arms."""
    with flow_guard(cfg, "evaluate"):
        return graph.through_evaluate(prefect_call, cfg)
