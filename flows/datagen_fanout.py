"""Datagen fanned out over a work pool: one flow run per range of shards, placed by Prefect (the loop that
submits, waits and re-submits is flows/fanout.py, shared with the hidden-state and evaluation fan-outs).

With `runtime.fanout_deployment` set (e.g. `datagen-shards/datagen-shards-local`, prefect.yaml), the graph's
datagen step (llm_trm_core/stages/graph.py `stage2_data`) calls `fan_out_shards` before its shard tasks:
the shards are cut into `runtime.fanout_workers` contiguous ranges, each range not committed yet becomes a
run of that deployment on its work pool. Every range run commits its shards to the shared store
(`datagen_shards_flow`); a range run that ends Failed, Crashed or Cancelled is submitted again (at most
`runtime.fanout_resubmits` times) and resumes from the store: committed shards come back cached, a
half-done shard continues after its last published part. When every range has completed, the caller's
own shard tasks find each shard committed and the report is assembled in-process, so the artifacts (keys
and bytes) are those of a one-worker run. docs/architecture.md ("Fan-out over workers") describes the setup.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from flows import fanout
from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages import graph
from llm_trm_core.stages.spread import shards_committed, spread_shards
from tasks.attempts import flow_guard

logger = logging.getLogger(__name__)


@flow(name="datagen-shards")
def datagen_shards_flow(cfg: PipelineConfig, first: int = 0, end: int | None = None) -> Manifests:
    """Datagen shards `first`..`end`-1 (every shard from `first` when `end` is unset), each committed to the
    store (resumable): the unit one worker runs when datagen is fanned out, spread over the worker's GPUs
    (`runtime.generation_processes`, llm_trm_core/stages/spread.py)."""
    with flow_guard(cfg, "datagen"):
        spread_shards(cfg, prefect_call("problems", cfg), first, end)
        return graph.datagen_shard_range(prefect_call, cfg, first, end)


def fan_out_shards(cfg: PipelineConfig, problems: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
    """Run every shard range not yet committed as a run of `runtime.fanout_deployment` (flows/fanout.py
    `fan_out`): at most `runtime.fanout_workers` at once, lost ones re-submitted; UserError when a range is
    still not done after `runtime.fanout_resubmits` re-submissions."""
    if cfg.runtime.fanout_deployment is None:
        return
    units = [
        fanout.Unit(f"shards {first}..{end - 1}", f"datagen-shards-{first}-{end - 1}", {"first": first, "end": end})
        for first, end in ranges
        if not shards_committed(cfg, problems, first, end)
    ]
    fanout.fan_out(cfg, "datagen", "shard ranges", units, len(ranges) - len(units))
