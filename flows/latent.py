"""Latent reasoning flows: train the injection of TRM output into the LM, and evaluate every arm."""

from __future__ import annotations

from prefect import flow

from flows.chain import Manifests, through_pairs
from llm_trm_core.config import PipelineConfig
from tasks.attempts import flow_guard
from tasks.caching import cached
from tasks.latent import evaluate_task, latent_task
from tasks.trm import trm_task


def through_latent(cfg: PipelineConfig) -> Manifests:
    out = through_pairs(cfg)
    out["trm"] = cached(trm_task, cfg)(cfg, out["pairs"], out["compressor-1b"])
    out["latent"] = cached(latent_task, cfg)(cfg, out["problems"], out["compressor-1b"], out["trm"])
    return out


def through_evaluate(cfg: PipelineConfig) -> Manifests:
    out = through_latent(cfg)
    out["evaluate"] = cached(evaluate_task, cfg)(cfg, out["problems"], out["compressor-1b"], out["trm"], out["latent"])
    return out


@flow(name="latent")
def latent_flow(cfg: PipelineConfig) -> Manifests:
    """Everything up to the TRM (cached), then the projection trained on answer likelihood."""
    with flow_guard(cfg, "latent"):
        return through_latent(cfg)


@flow(name="evaluate")
def evaluate_flow(cfg: PipelineConfig) -> Manifests:
    """End-task accuracy of no-think, think, TRM-latent, random-latent and original-style arms."""
    with flow_guard(cfg, "evaluate"):
        return through_evaluate(cfg)
