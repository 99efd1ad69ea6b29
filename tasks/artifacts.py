"""Publish a stage's manifest as Prefect artifacts: a metrics table, a comparison table, a summary."""

from __future__ import annotations

import json
import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llm_trm_core.config import PipelineConfig
from llm_trm_core.reporting import comparison_rows, flatten, fmt, png_markdown
from llm_trm_core.store import ArtifactStore, Manifest


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def store_link(uri: str) -> str:
    """Markdown for an artifact's store URI: a Cloud Console link for gs://, the URI itself otherwise."""
    if uri.startswith(("gs://", "gcs://")):
        path = uri.split("://", 1)[1]
        return f"[`{uri}`](https://console.cloud.google.com/storage/browser/{path})"
    return f"`{uri}`"


def publish_manifest(manifest: Manifest, title: str, extra_markdown: str = "") -> None:
    rows = comparison_rows(manifest.metrics)
    if rows:
        create_table_artifact(
            key=artifact_key(manifest.stage, "comparison"),
            table=[{k: fmt(v) for k, v in row.items()} for row in rows],
            description=f"{title}: held-out metrics beside baselines",
        )
    flat = {k: v for k, v in flatten(manifest.metrics).items() if not isinstance(v, list)}
    if flat:
        create_table_artifact(
            key=artifact_key(manifest.stage, "metrics"),
            table=[{"metric": k, "value": fmt(v)} for k, v in sorted(flat.items())],
            description=f"{title}: {manifest.uri}",
        )
    create_markdown_artifact(
        key=artifact_key(manifest.stage, "artifact"),
        markdown=(
            f"### {title}\n\n- store URI: {store_link(manifest.uri)}\n- key: `{manifest.key}`\n"
            f"- files: {len(manifest.files)}\n- completed: {manifest.completed_at}\n\n{extra_markdown}"
        ),
        description=f"{manifest.stage} artifact",
    )


def report_with_plot(store: ArtifactStore, manifest: Manifest, png: str, alt: str) -> str:
    """The artifact's report.md followed by one of its PNG plots inline (renders in the Prefect UI)."""
    artifact = store.open(manifest.stage, manifest.key)
    return artifact.read_bytes("report.md").decode() + "\n\n" + png_markdown(artifact.read_bytes(png), alt)


def publish_config(cfg: PipelineConfig) -> None:
    """The run's resolved config (preset + what was set), so the UI shows exactly what ran."""
    dumped = json.dumps(cfg.model_dump(mode="json"), indent=2)
    create_markdown_artifact(
        key="resolved-config",
        markdown=f"### Resolved config (preset `{cfg.preset}`)\n\n```json\n{dumped}\n```",
        description="The configuration this run used: its preset with the fields the run set",
    )
