"""Stage 1 flows: the compressor (1a on text; 1b on thinking traces) and the D' sweep."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.stages.compressor import with_compressor
from llm_trm_core.stages.sweep import sweep_points
from tasks.compressor import basis_task, compressor_task, hiddens_task, sweep_report_task
from tasks.logs import core_logs_to_prefect


def stage1_inputs(cfg: PipelineConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    hiddens = hiddens_task(cfg)
    return hiddens, basis_task(cfg, hiddens)


@flow(name="compressor")
def compressor_flow(cfg: PipelineConfig, phase: Literal["1a", "1b"] = "1a") -> dict[str, dict[str, Any]]:
    """Compressor 1a: corpus hidden states (once) -> closed-form basis (once) -> the configured compressor."""
    if phase == "1b":
        raise UserError(
            "compressor phase 1b trains on the thinking traces of the datagen stage, which is not built yet; "
            "run phase 1a"
        )
    with core_logs_to_prefect():
        hiddens, basis = stage1_inputs(cfg)
        compressor = compressor_task(cfg, hiddens, basis, phase="1a")
    return {"hiddens": hiddens, "basis": basis, "compressor": compressor}


@flow(name="sweep")
def sweep_flow(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """One closed-form and one SGD compressor per D' (below the hidden size), then a comparison report."""
    with core_logs_to_prefect():
        hiddens, basis = stage1_inputs(cfg)
        points = [
            compressor_task(with_compressor(cfg, d_prime=d, solver=solver), hiddens, basis)
            for d, solver in sweep_points(cfg, int(hiddens["metrics"]["hidden_size"]))
        ]
        report = sweep_report_task(cfg, points)
    return {"hiddens": hiddens, "basis": basis, "sweep": report}
