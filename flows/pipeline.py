"""The end-to-end pipeline flow. Stages join it as they land (see the issues)."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, through_pairs
from llm_trm_core.config import PipelineConfig
from tasks.logs import core_logs_to_prefect
from tasks.trm import trm_task


@flow(name="pipeline")
def pipeline(cfg: PipelineConfig) -> Manifests:
    """problems -> compressor 1a -> datagen -> compressor 1b -> pairs -> trm, each cached by its store key."""
    with core_logs_to_prefect():
        out = through_pairs(cfg)
        out["trm"] = trm_task(cfg, out["pairs"], out["compressor-1b"])
    return out
