"""Prefect tasks for stage 2 data (thin wrappers over llm_trm_core.stages.datagen / pairs)."""

from __future__ import annotations

from typing import Any

from prefect import task

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.datagen import ShardSpec, run_datagen_report, run_datagen_shard
from llm_trm_core.stages.pairs import run_pairs, run_trace_hiddens
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.artifacts import artifact_key, publish_manifest, report_with_plot
from tasks.retry import RETRIES


@task(name="datagen-shard", task_run_name="datagen-shard-{index}", **RETRIES)
def datagen_shard_task(
    cfg: PipelineConfig, problems: dict[str, Any], index: int, start: int, end: int
) -> dict[str, Any]:
    """One shard of problems: committed shards come back at once; a killed shard resumes where it stopped."""
    manifest = run_datagen_shard(
        cfg, ArtifactStore(cfg.store.root), Manifest.model_validate(problems), ShardSpec(index, start, end)
    )
    return manifest.model_dump(mode="json")


@task(name="datagen-report", **RETRIES)
def datagen_report_task(cfg: PipelineConfig, problems: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    store = ArtifactStore(cfg.store.root)
    manifest = run_datagen_report(
        cfg, store, Manifest.model_validate(problems), [Manifest.model_validate(s) for s in shards]
    )
    body = report_with_plot(store, manifest, "think_length.png", "thinking length")
    publish_manifest(manifest, "Thinking generation", body)
    return manifest.model_dump(mode="json")


@task(name="trace-hiddens", **RETRIES)
def trace_hiddens_task(cfg: PipelineConfig, datagen: dict[str, Any]) -> dict[str, Any]:
    manifest = run_trace_hiddens(cfg, ArtifactStore(cfg.store.root), Manifest.model_validate(datagen))
    publish_manifest(manifest, "Thinking-trace hidden states")
    return manifest.model_dump(mode="json")


@task(name="pairs", **RETRIES)
def pairs_task(cfg: PipelineConfig, datagen: dict[str, Any], compressor: dict[str, Any]) -> dict[str, Any]:
    manifest = run_pairs(
        cfg, ArtifactStore(cfg.store.root), Manifest.model_validate(datagen), Manifest.model_validate(compressor)
    )
    publish_manifest(manifest, f"Compressed pairs (D'={manifest.metrics['d_prime']})")
    return manifest.model_dump(mode="json")


__all__ = ["artifact_key", "datagen_report_task", "datagen_shard_task", "pairs_task", "trace_hiddens_task"]
