"""Publish a stage's manifest as Prefect artifacts (a metrics table and a link to the store URI)."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llm_trm_core.store import Manifest


def artifact_key(stage: str, suffix: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{stage}-{suffix}".lower()).strip("-")


def publish_manifest(manifest: Manifest, title: str) -> None:
    rows = [{"metric": k, "value": v} for k, v in sorted(manifest.metrics.items())]
    if rows:
        create_table_artifact(
            key=artifact_key(manifest.stage, "metrics"), table=rows, description=f"{title}: {manifest.uri}"
        )
    create_markdown_artifact(
        key=artifact_key(manifest.stage, "artifact"),
        markdown=(
            f"### {title}\n\n- store URI: `{manifest.uri}`\n- key: `{manifest.key}`\n"
            f"- files: {len(manifest.files)}\n- completed: {manifest.completed_at}\n"
        ),
        description=f"{manifest.stage} artifact",
    )
