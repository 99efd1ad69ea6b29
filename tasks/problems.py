"""Prefect task for the `problems` stage: a thin wrapper over llm_trm_core.stages.problems."""

from __future__ import annotations

from typing import Any

from prefect import task

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.store import ArtifactStore
from tasks.artifacts import publish_manifest
from tasks.retry import RETRIES


@task(name="problems", **RETRIES)
def problems_task(cfg: PipelineConfig) -> dict[str, Any]:
    manifest = run_problems(cfg, ArtifactStore(cfg.store.root))
    publish_manifest(manifest, title="Problem set")
    return manifest.model_dump(mode="json")
