"""Stage 1 flows: the compressor (1a on text; 1b on thinking traces from 1a) and the D' sweep."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from tasks.attempts import flow_guard


@flow(name="compressor")
def compressor_flow(cfg: PipelineConfig, phase: Literal["1a", "1b"] = "1a") -> Manifests:
    """1a: corpus hidden states (once) -> closed-form basis (once) -> the configured compressor.
    1b: additionally generates thinking traces (datagen) and fine-tunes the 1a compressor on them."""
    with flow_guard(cfg, "compressor-1b" if phase == "1b" else "compressor"):
        return graph.compressor(prefect_call, cfg, phase)


@flow(name="sweep")
def sweep_flow(cfg: PipelineConfig) -> Manifests:
    """One closed-form and one SGD compressor per D' (below the hidden size), then a comparison report."""
    with flow_guard(cfg, "sweep"):
        return graph.sweep(prefect_call, cfg)
