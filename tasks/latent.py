"""Prefect tasks for latent reasoning and end-task evaluation (thin wrappers)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from llm_trm_core.config import PipelineConfig
from llm_trm_core.reporting import fmt
from llm_trm_core.stages.evaluate import CHANGE_COLUMNS, COLUMNS, run_evaluate
from llm_trm_core.stages.latent import run_latent
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.artifacts import publish_manifest, report_with_plot
from tasks.retry import RETRIES


@task(name="latent", **RETRIES)
def latent_task(
    cfg: PipelineConfig, problems: dict[str, Any], compressor: dict[str, Any], trm: dict[str, Any]
) -> dict[str, Any]:
    p, c, t = (Manifest.model_validate(x) for x in (problems, compressor, trm))
    manifest = run_latent(cfg, ArtifactStore(cfg.store.root), p, c, t)
    publish_manifest(manifest, f"Latent injection (k={cfg.latent.num_latents})")
    return manifest.model_dump(mode="json")


@task(name="evaluate", **RETRIES)
def evaluate_task(
    cfg: PipelineConfig,
    problems: dict[str, Any],
    compressor: dict[str, Any],
    trm: dict[str, Any],
    latent: dict[str, Any],
    grpo: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Without `grpo`: the policy of the latent stage (before GRPO). With `grpo` and `before`: after GRPO,
    with a before/after table on the same problems."""
    store = ArtifactStore(cfg.store.root)
    p, c, t, lat = (Manifest.model_validate(x) for x in (problems, compressor, trm, latent))
    g = Manifest.model_validate(grpo) if grpo else None
    b = Manifest.model_validate(before) if before else None
    manifest = run_evaluate(cfg, store, p, c, t, lat, grpo=g, before=b)
    when = "after-grpo" if g else "before-grpo"
    create_table_artifact(
        key=f"evaluate-accuracy-{when}",
        table=[{c: fmt(row.get(c)) for c in COLUMNS} for row in manifest.metrics["rows"]],
        description=f"End-task accuracy ({when}) on {manifest.metrics['n']} held-out test problems (95% CIs)",
    )
    if manifest.metrics.get("before_after"):
        create_table_artifact(
            key="evaluate-before-after-grpo",
            table=[{c: fmt(row.get(c)) for c in CHANGE_COLUMNS} for row in manifest.metrics["before_after"]],
            description="End-task accuracy before vs after GRPO on the same problems (paired bootstrap CIs)",
        )
    publish_manifest(
        manifest, f"End-task evaluation ({when})", report_with_plot(store, manifest, "accuracy.png", "accuracy")
    )
    return manifest.model_dump(mode="json")
