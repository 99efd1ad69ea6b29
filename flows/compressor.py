"""Stage 1 flows: the compressor (1a on text; 1b on thinking traces from 1a) and the D' sweep."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows.chain import Manifests, stage1a, stage1b, stage2_data
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.compressor import with_compressor
from llm_trm_core.stages.sweep import sweep_points
from tasks.attempts import flow_guard
from tasks.caching import cached
from tasks.compressor import basis_task, compressor_task, hiddens_task, sweep_report_task
from tasks.problems import problems_task


@flow(name="compressor")
def compressor_flow(cfg: PipelineConfig, phase: Literal["1a", "1b"] = "1a") -> Manifests:
    """1a: corpus hidden states (once) -> closed-form basis (once) -> the configured compressor.
    1b: additionally generates thinking traces (datagen) and fine-tunes the 1a compressor on them."""
    with flow_guard(cfg, "compressor-1b" if phase == "1b" else "compressor"):
        out = stage1a(cfg)
        if phase == "1b":
            problems = cached(problems_task, cfg)(cfg)
            datagen = stage2_data(cfg, problems)
            out.update({"problems": problems, "datagen": datagen, **stage1b(cfg, out["compressor-1a"], datagen)})
    return out


@flow(name="sweep")
def sweep_flow(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """One closed-form and one SGD compressor per D' (below the hidden size), then a comparison report."""
    with flow_guard(cfg, "sweep"):
        hiddens = cached(hiddens_task, cfg)(cfg)
        basis = cached(basis_task, cfg)(cfg, hiddens)
        points = [
            cached(compressor_task, cfg)(with_compressor(cfg, d_prime=d, solver=solver), hiddens, basis)
            for d, solver in sweep_points(cfg, int(hiddens["metrics"]["hidden_size"]))
        ]
        report = cached(sweep_report_task, cfg)(cfg, points)
    return {"hiddens": hiddens, "basis": basis, "sweep": report}
