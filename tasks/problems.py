"""Prefect task for the `problems` stage: a thin wrapper over llm_trm_core.stages.problems."""

from __future__ import annotations

from typing import Any

from prefect import task

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.store import ArtifactStore
from tasks.artifacts import publish_manifest
from tasks.retry import retry_transient


@task(name="problems", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def problems_task(cfg: PipelineConfig) -> dict[str, Any]:
    manifest = run_problems(cfg, ArtifactStore(cfg.store.root))
    publish_manifest(manifest, title="Problem set")
    return manifest.model_dump(mode="json")
