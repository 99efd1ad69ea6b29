"""The end-to-end pipeline flow. Stages join it as they land (see the issues)."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests
from flows.latent import through_evaluate
from llm_trm_core.config import PipelineConfig
from tasks.logs import core_logs_to_prefect


@flow(name="pipeline")
def pipeline(cfg: PipelineConfig) -> Manifests:
    """problems -> 1a -> datagen -> 1b -> pairs -> trm -> latent -> evaluate, each cached by its store key."""
    with core_logs_to_prefect():
        return through_evaluate(cfg)
