"""The Prefect side of the pipeline graph (llm_trm_core/stages/graph.py): `prefect_call` runs a stage
as its cached Prefect task, so every flow is a graph function called with it.

Call them inside a flow. Every task returns at once when its artifact is already committed. With
`runtime.fanout_deployment` (and `fanout_hiddens_deployment`, `fanout_evaluate_deployment`) set,
`prefect_call` also fans datagen shards (hidden-state parts, evaluation chunks) out over a work pool
(flows/fanout.py) before the graph's own task reads them back.
"""

from __future__ import annotations

from typing import Any

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.graph import Manifests
from tasks.caching import cached
from tasks.stage import stage_task

__all__ = ["Manifests", "PrefectCall", "prefect_call"]


class PrefectCall:
    """The graph's `Call` inside a flow: each stage as its cached Prefect task; fanned-out units as flow runs."""

    spreads_locally = True  # generation work may go to this machine's other GPUs first (graph `_spreads`)

    def __call__(self, task: str, cfg: PipelineConfig, /, *inputs: Any, **options: Any) -> dict[str, Any]:
        """Run Prefect task `task` (of its declared stage) on `cfg`, cached by its store key."""
        return cached(stage_task(task), cfg)(cfg, *inputs, **options)

    def fan_out_shards(self, cfg: PipelineConfig, problems: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
        """Run each shard range as a run of `runtime.fanout_deployment` and wait for all (re-submitting lost ones)."""
        from flows.datagen_fanout import fan_out_shards

        fan_out_shards(cfg, problems, ranges)

    def fan_out_hiddens(self, cfg: PipelineConfig, parts: int) -> None:
        """Run the corpus hidden-state pass as `parts` runs of `runtime.fanout_hiddens_deployment` and wait."""
        from flows.fanout import fan_out_hiddens

        fan_out_hiddens(cfg, parts)

    def fan_out_evaluation(self, cfg: PipelineConfig, inputs: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
        """Run each evaluation chunk range as a run of `runtime.fanout_evaluate_deployment` and wait for all."""
        from flows.fanout import fan_out_evaluation

        fan_out_evaluation(cfg, inputs, ranges)


prefect_call = PrefectCall()
