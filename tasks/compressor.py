"""Prefect tasks for stage 1 (thin wrappers over llm_trm_core.stages.compressor / sweep)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import task

from llm_trm_core.config import PipelineConfig
from llm_trm_core.launch import launch_stage
from llm_trm_core.stages.compressor import run_basis, run_compressor, run_corpus_hiddens
from llm_trm_core.stages.sweep import run_sweep_report
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.artifacts import publish_manifest, report_with_plot
from tasks.retry import RETRIES


@task(name="hiddens", **RETRIES)
def hiddens_task(cfg: PipelineConfig) -> dict[str, Any]:
    manifest = run_corpus_hiddens(cfg, ArtifactStore(cfg.store.root))
    publish_manifest(manifest, "Corpus hidden states")
    return manifest.model_dump(mode="json")


@task(name="basis", **RETRIES)
def basis_task(cfg: PipelineConfig, hiddens: dict[str, Any]) -> dict[str, Any]:
    manifest = run_basis(cfg, ArtifactStore(cfg.store.root), Manifest.model_validate(hiddens))
    publish_manifest(manifest, "Closed-form basis")
    return manifest.model_dump(mode="json")


@task(name="compressor", **RETRIES)
def compressor_task(
    cfg: PipelineConfig,
    hiddens: dict[str, Any],
    basis: dict[str, Any],
    phase: Literal["1a", "1b"] = "1a",
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    store = ArtifactStore(cfg.store.root)
    if cfg.runtime.num_processes > 1 and phase == "1a" and cfg.compressor.solver == "sgd":
        # multi-process SGD: torchrun as a child process that dies with this task's process
        result = launch_stage("llm_trm_core.stages.compressor", cfg, cfg.runtime.num_processes)
        committed = store.read_manifest("compressor", result["key"])
        assert committed is not None, result
        manifest = committed
    else:
        manifest = run_compressor(
            cfg,
            store,
            Manifest.model_validate(hiddens),
            Manifest.model_validate(basis),
            phase=phase,
            init=Manifest.model_validate(init) if init else None,
        )
    publish_manifest(manifest, f"Compressor {phase} D'={cfg.compressor.d_prime} ({cfg.compressor.solver})")
    return manifest.model_dump(mode="json")


@task(name="sweep-report", **RETRIES)
def sweep_report_task(cfg: PipelineConfig, points: list[dict[str, Any]]) -> dict[str, Any]:
    store = ArtifactStore(cfg.store.root)
    manifest = run_sweep_report(cfg, store, [Manifest.model_validate(p) for p in points])
    publish_manifest(manifest, "Compressor sweep", report_with_plot(store, manifest, "plot.png", "sweep"))
    return manifest.model_dump(mode="json")
