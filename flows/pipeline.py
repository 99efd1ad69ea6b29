"""The end-to-end pipeline flow. Stages join it as they land (see the issues)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.compressor import stage1_inputs
from llm_trm_core.config import PipelineConfig
from tasks.compressor import compressor_task
from tasks.logs import core_logs_to_prefect
from tasks.problems import problems_task


@flow(name="pipeline")
def pipeline(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Run every stage that exists, each cached by its store key. Returns {stage: manifest}."""
    with core_logs_to_prefect():
        problems = problems_task(cfg)
        hiddens, basis = stage1_inputs(cfg)
        compressor = compressor_task(cfg, hiddens, basis, phase="1a")
    return {"problems": problems, "hiddens": hiddens, "basis": basis, "compressor": compressor}
