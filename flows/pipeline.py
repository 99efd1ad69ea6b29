"""The end-to-end pipeline flow. Stages join it as they land (see the issues)."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests
from flows.latent import through_latent
from llm_trm_core.config import PipelineConfig
from tasks.latent import evaluate_task
from tasks.logs import core_logs_to_prefect


@flow(name="pipeline")
def pipeline(cfg: PipelineConfig) -> Manifests:
    """problems -> 1a -> datagen -> 1b -> pairs -> trm -> latent -> evaluate, each cached by its store key."""
    with core_logs_to_prefect():
        out = through_latent(cfg)
        out["evaluate"] = evaluate_task(cfg, out["problems"], out["compressor-1b"], out["trm"], out["latent"])
    return out
