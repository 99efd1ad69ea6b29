"""The end-to-end pipeline flow: every stage, each a task cached by its artifact-store key."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests
from flows.grpo import through_grpo
from llm_trm_core.config import PipelineConfig
from tasks.attempts import flow_guard


@flow(name="pipeline")
def pipeline(cfg: PipelineConfig) -> Manifests:
    """problems -> 1a -> datagen -> 1b -> pairs -> trm -> latent -> evaluate (before) -> grpo -> evaluate
    (after, with the before/after table), each cached by its store key."""
    with flow_guard(cfg):
        return through_grpo(cfg)
