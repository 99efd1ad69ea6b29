"""Building blocks shared by the flows: each calls the stage tasks in dependency order.

Call them inside a flow. Every task returns at once when its artifact is already committed.
"""

from __future__ import annotations

from typing import Any

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.datagen import plan_shards
from tasks.caching import cached
from tasks.compressor import basis_task, compressor_task, hiddens_task
from tasks.datagen import datagen_report_task, datagen_shard_task, pairs_task, trace_hiddens_task
from tasks.problems import problems_task

Manifests = dict[str, dict[str, Any]]


def stage1a(cfg: PipelineConfig) -> Manifests:
    hiddens = cached(hiddens_task, cfg)(cfg)
    basis = cached(basis_task, cfg)(cfg, hiddens)
    return {
        "hiddens": hiddens,
        "basis": basis,
        "compressor-1a": cached(compressor_task, cfg)(cfg, hiddens, basis, phase="1a"),
    }


def stage2_data(cfg: PipelineConfig, problems: dict[str, Any]) -> dict[str, Any]:
    """Datagen: one task per shard (resumable), then the report."""
    count = min(cfg.datagen.num_problems, int(problems["metrics"]["total"]))
    shard_task = cached(datagen_shard_task, cfg)
    shards = [shard_task(cfg, problems, s.index, s.start, s.end) for s in plan_shards(cfg, count)]
    return cached(datagen_report_task, cfg)(cfg, problems, shards)


def stage1b(cfg: PipelineConfig, compressor_1a: dict[str, Any], datagen: dict[str, Any]) -> Manifests:
    traces = cached(trace_hiddens_task, cfg)(cfg, datagen)
    basis = cached(basis_task, cfg)(cfg, traces)
    tuned = cached(compressor_task, cfg)(cfg, traces, basis, phase="1b", init=compressor_1a)
    return {"trace-hiddens": traces, "trace-basis": basis, "compressor-1b": tuned}


def through_pairs(cfg: PipelineConfig) -> Manifests:
    """problems -> 1a -> datagen -> 1b -> pairs (compressed with the 1b compressor)."""
    out: Manifests = {"problems": cached(problems_task, cfg)(cfg)}
    out.update(stage1a(cfg))
    out["datagen"] = stage2_data(cfg, out["problems"])
    out.update(stage1b(cfg, out["compressor-1a"], out["datagen"]))
    out["pairs"] = cached(pairs_task, cfg)(cfg, out["datagen"], out["compressor-1b"])
    return out
