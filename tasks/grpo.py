"""Prefect task for the GRPO stage (thin wrapper): reward curves and the held-out before/after table."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from llm_trm_core.config import PipelineConfig
from llm_trm_core.reporting import fmt
from llm_trm_core.stages.grpo import CHECK_COLUMNS, run_grpo
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.artifacts import publish_manifest, report_with_plot
from tasks.retry import RETRIES


@task(name="grpo", **RETRIES)
def grpo_task(
    cfg: PipelineConfig,
    problems: dict[str, Any],
    compressor: dict[str, Any],
    trm: dict[str, Any],
    latent: dict[str, Any],
) -> dict[str, Any]:
    store = ArtifactStore(cfg.store.root)
    p, c, t, lat = (Manifest.model_validate(x) for x in (problems, compressor, trm, latent))
    manifest = run_grpo(cfg, store, p, c, t, lat)
    create_table_artifact(
        key="grpo-heldout-before-after",
        table=[{c: fmt(row.get(c)) for c in CHECK_COLUMNS} for row in manifest.metrics["heldout"]],
        description=f"GRPO: greedy accuracy before/after on {manifest.metrics['heldout_problems']} held-out problems",
    )
    create_table_artifact(
        key="grpo-steps",
        table=[{k: fmt(v) for k, v in row.items()} for row in manifest.metrics["history"]],
        description="GRPO per-step metrics (reward, accuracy, KL, clip fraction, entropy, length, skipped groups)",
    )
    publish_manifest(manifest, "GRPO", report_with_plot(store, manifest, "rewards.png", "reward curves"))
    return manifest.model_dump(mode="json")
