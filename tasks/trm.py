"""Prefect task for stage 2 model (a thin wrapper over llm_trm_core.stages.trm)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from llm_trm_core.config import PipelineConfig
from llm_trm_core.reporting import fmt
from llm_trm_core.stages.trm import COLUMNS, run_trm
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.artifacts import publish_manifest, report_with_plot
from tasks.retry import RETRIES


@task(name="trm", **RETRIES)
def trm_task(cfg: PipelineConfig, pairs: dict[str, Any], compressor: dict[str, Any]) -> dict[str, Any]:
    store = ArtifactStore(cfg.store.root)
    manifest = run_trm(cfg, store, Manifest.model_validate(pairs), Manifest.model_validate(compressor))
    metrics = manifest.metrics
    rows = [{"name": f"baseline: {name}", **values} for name, values in metrics["baselines"].items()]
    rows += [{"name": f"TRM step {row['step']}", **row} for row in metrics["per_step"]]
    create_table_artifact(
        key="trm-report",
        table=[{c: fmt(row.get(c)) for c in COLUMNS} for row in rows],
        description="TRM per supervision step beside baselines (held-out test split)",
    )
    publish_manifest(manifest, "TRM", report_with_plot(store, manifest, "per_step.png", "per step"))
    return manifest.model_dump(mode="json")
