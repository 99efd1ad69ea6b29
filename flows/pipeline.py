"""The end-to-end pipeline flow, and the flow of any one declared stage."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from tasks.attempts import flow_guard


@flow(name="pipeline")
def pipeline(cfg: PipelineConfig) -> Manifests:
    """problems -> 1a -> datagen -> 1b -> pairs -> trm -> latent -> evaluate (before) -> grpo -> evaluate
    (after, with the before/after table), each cached by its store key."""
    with flow_guard(cfg):
        return graph.pipeline(prefect_call, cfg)


@flow(name="stage")
def stage_flow(cfg: PipelineConfig, stage: str) -> Manifests:
    """One declared stage (by name, e.g. a stage added in a file of its own) with everything upstream of it."""
    with flow_guard(cfg, stage):
        return graph.through(prefect_call, cfg, stage)
