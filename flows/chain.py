"""The Prefect side of the pipeline graph (llm_trm_core/stages/graph.py): `prefect_call` runs a stage
as its cached Prefect task, so every flow is a graph function called with it.

Call them inside a flow. Every task returns at once when its artifact is already committed.
"""

from __future__ import annotations

from typing import Any

from llm_trm_core.config import PipelineConfig
from llm_trm_core.stages.graph import Manifests
from tasks.caching import cached
from tasks.stage import stage_task

__all__ = ["Manifests", "prefect_call"]


def prefect_call(task: str, cfg: PipelineConfig, /, *inputs: Any, **options: Any) -> dict[str, Any]:
    """Run Prefect task `task` (of its declared stage) on `cfg`, cached by its store key."""
    return cached(stage_task(task), cfg)(cfg, *inputs, **options)
