"""The flagship rehearsal: the pipeline flow on the smollm3-3b preset with local stand-ins, measured per stage.

`rehearse(cfg)` runs the real `pipeline` flow (every stage a Prefect task in this process) while
`RssSampler` samples the process's RSS; afterwards the flow run's task runs (start and end times, read
back from the Prefect API) cut the samples into per-stage windows. Each row: the stage, its task runs,
wall time, peak RSS inside its windows, and the rows per split its manifest reports.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import pipeline as pipeline_flow
from llm_trm_core.config import PipelineConfig
from llm_trm_core.rehearsal import RssSampler, peak_rss, rows_per_split

# task run name prefix -> the result key(s) whose manifest gives the rows per split
STAGE_ORDER = (
    "problems",
    "hiddens",
    "basis",
    "compressor",
    "datagen-shard",
    "datagen-report",
    "trace-hiddens",
    "pairs",
    "trm",
    "latent",
    "evaluate-before-grpo",
    "grpo",
    "evaluate-after-grpo",
)
RESULT_KEYS = {
    "problems": ("problems",),
    "hiddens": ("hiddens",),
    "basis": ("basis", "trace-basis"),
    "compressor": ("compressor-1a", "compressor-1b"),
    "datagen-report": ("datagen",),
    "trace-hiddens": ("trace-hiddens",),
    "pairs": ("pairs",),
    "trm": ("trm",),
    "latent": ("latent",),
    "evaluate-before-grpo": ("evaluate-before",),
    "grpo": ("grpo",),
    "evaluate-after-grpo": ("evaluate",),
}


@dataclass
class StageRow:
    stage: str
    runs: int
    states: list[str]
    seconds: float
    peak_rss: int
    rows: dict[str, int | None]

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "runs": self.runs,
            "states": self.states,
            "seconds": round(self.seconds, 2),
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            **{f"rows_{k}": v for k, v in self.rows.items()},
        }


def _stage_of(task_run_name: str) -> str:
    for stage in sorted(STAGE_ORDER, key=len, reverse=True):
        if task_run_name == stage or task_run_name.startswith(stage + "-"):
            return stage
    return task_run_name.rsplit("-", 1)[0]


def rehearse(cfg: PipelineConfig) -> tuple[dict[str, Any], list[StageRow], dict[str, float]]:
    """Run the pipeline flow; return its manifests, the per-stage table and totals."""
    start = time.time()
    with RssSampler() as sampler:
        state = pipeline_flow(cfg, return_state=True)
    results: dict[str, Any] = state.result()  # raises the flow's error, if any
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    windows: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for run in task_runs:
        if run.start_time is None:
            continue
        end = run.end_time or run.start_time
        windows[_stage_of(run.name)].append(
            (run.start_time.timestamp(), end.timestamp(), (run.state.name or "?") if run.state else "?")
        )
    rows: list[StageRow] = []
    for stage in [*STAGE_ORDER, *sorted(set(windows) - set(STAGE_ORDER))]:
        spans = windows.get(stage)
        if not spans:
            continue
        manifests = [results[k] for k in RESULT_KEYS.get(stage, ()) if k in results]
        if stage == "datagen-shard":
            manifests = []  # shards count problems only; the report gives the split breakdown
        counts = (
            rows_per_split(stage, manifests[-1]["metrics"]) if manifests else dict.fromkeys(("train", "val", "test"))
        )
        rows.append(
            StageRow(
                stage=stage,
                runs=len(spans),
                states=sorted({s for _, _, s in spans}),
                seconds=sum(e - s for s, e, _ in spans),
                peak_rss=max(sampler.peak_between(s, e) for s, e, _ in spans),
                rows=counts,
            )
        )
    totals = {"seconds": time.time() - start, "peak_rss": float(peak_rss())}
    return results, rows, totals
