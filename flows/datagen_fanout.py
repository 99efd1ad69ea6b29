"""Datagen fanned out over a work pool: one flow run per range of shards, placed by Prefect.

With `runtime.fanout_deployment` set (e.g. `datagen-shards/datagen-shards-local`, prefect.yaml), the graph's
datagen step (llm_trm_core/stages/graph.py `stage2_data`) calls `fan_out_shards` before its shard tasks:
the shards are cut into `runtime.fanout_workers` contiguous ranges, each range becomes a run of that
deployment (`run_deployment`, linked to the calling run as a subflow) on the deployment's work pool, so at
most `fanout_workers` ranges run at once. Every range run commits its shards to the shared store
(`datagen_shards_flow`). The caller waits; a range run that ends Failed, Crashed or Cancelled (its worker
preempted or killed) is submitted again, at most `runtime.fanout_resubmits` times per range, and resumes
from the store: committed shards come back cached, a half-done shard continues after its last published
part. When every range has completed, the caller's own shard tasks find each shard committed and the
report is assembled in-process, so the artifacts (keys and bytes) are those of a one-worker run.
docs/architecture.md ("Fan-out over workers") describes the setup.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.chain import Manifests, prefect_call
from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.stages import graph
from llm_trm_core.store import ArtifactStore, Manifest
from tasks.attempts import flow_guard

logger = logging.getLogger(__name__)

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_SECONDS = 2.0  # between reads of the range runs' states
REPORT_SECONDS = 60.0  # between progress lines while waiting


@flow(name="datagen-shards")
def datagen_shards_flow(cfg: PipelineConfig, first: int = 0, end: int | None = None) -> Manifests:
    """Datagen shards `first`..`end`-1 (every shard from `first` when `end` is unset), each committed to the
    store (resumable): the unit one worker runs when datagen is fanned out."""
    with flow_guard(cfg, "datagen"):
        return graph.datagen_shard_range(prefect_call, cfg, first, end)


def range_parameters(cfg: PipelineConfig, first: int, end: int) -> dict[str, Any]:
    """A range run's parameters: the caller's resolved config and the shard range."""
    return {"cfg": cfg.model_dump(mode="json"), "first": first, "end": end}


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "a temporary server (PREFECT_API_URL is unset)")


def check_deployment(client: SyncPrefectClient, name: str) -> str:
    """The work pool of deployment `name`; UserError (one line naming the fix) when either does not exist."""
    unset = "or unset runtime.fanout_deployment to run every shard in this run"
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise UserError(
            f"runtime.fanout_deployment={name}: no such deployment on the Prefect API at {_api()}. Fix: deploy it "
            f"(python -m deployments.deploy) on the server the workers use (PREFECT_API_URL), {unset}"
        ) from None
    pool = deployment.work_pool_name
    if not pool:
        raise UserError(f"runtime.fanout_deployment={name} has no work pool; redeploy it with one, {unset}")
    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise UserError(
            f"runtime.fanout_deployment={name}: its work pool {pool} does not exist. Fix: create it "
            f"(python -m deployments.deploy) and start a worker on it (prefect worker start --pool {pool}), {unset}"
        ) from None
    if not any(w.status is not None and w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(pool)):
        logger.warning("work pool %s has no online worker yet: the shard ranges wait until one starts", pool)
    return pool


def check_fanout(cfg: PipelineConfig) -> None:
    """Refuse (one-line UserError) a `runtime.fanout_deployment` that does not exist or has no work pool:
    the CLI calls this before the flow starts."""
    if cfg.runtime.fanout_deployment is not None:
        with get_client(sync_client=True) as client:
            check_deployment(client, cfg.runtime.fanout_deployment)


@dataclass
class RangeRun:
    """One shard range and the flow runs submitted for it (the last is current)."""

    first: int
    end: int
    runs: list[FlowRun] = field(default_factory=list)
    state: str = "SCHEDULED"

    @property
    def label(self) -> str:
        return f"shards {self.first}..{self.end - 1}"


def _submit(cfg: PipelineConfig, deployment: str, unit: RangeRun) -> None:
    attempt = len(unit.runs) + 1
    run: FlowRun = run_deployment(  # type: ignore[assignment]
        deployment,
        parameters=range_parameters(cfg, unit.first, unit.end),
        flow_run_name=f"datagen-shards-{unit.first}-{unit.end - 1}-try{attempt}",
        timeout=0,
        as_subflow=True,
    )
    unit.runs.append(run)
    unit.state = "SCHEDULED"
    logger.info("%s: submitted run %s (attempt %d) to %s", unit.label, run.name, attempt, deployment)


def committed(cfg: PipelineConfig, problems: dict[str, Any], first: int, end: int) -> bool:
    """Whether every shard of range `first`..`end`-1 is committed to the store already."""
    from llm_trm_core.datagen.artifacts import SHARD_STAGE
    from llm_trm_core.stages.datagen import plan_shards, shard_key

    manifest = Manifest.model_validate(problems)
    store = ArtifactStore(cfg.store.root)
    specs = plan_shards(cfg, min(cfg.datagen.num_problems, int(manifest.metrics["total"])))[first:end]
    return all(store.read_manifest(SHARD_STAGE, shard_key(cfg, manifest, s)) is not None for s in specs)


def fan_out_shards(cfg: PipelineConfig, problems: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
    """Run every shard range not yet committed as a run of `runtime.fanout_deployment`, at most
    `runtime.fanout_workers` at once; wait for all, re-submitting lost ones (module docstring). UserError when
    a range is still not done after `runtime.fanout_resubmits` re-submissions."""
    deployment = cfg.runtime.fanout_deployment
    if deployment is None:
        return
    limit = cfg.runtime.fanout_workers
    resubmits = cfg.runtime.fanout_resubmits
    units = [RangeRun(first, end) for first, end in ranges if not committed(cfg, problems, first, end)]
    if len(units) < len(ranges):
        done = len(ranges) - len(units)
        logger.info("datagen fan-out: %d of %d shard ranges are committed already", done, len(ranges))
    if not units:
        return
    with get_client(sync_client=True) as client:
        pool = check_deployment(client, deployment)
        logger.info(
            "datagen fan-out: %d shard ranges on %s (pool %s), at most %d at once",
            len(units), deployment, pool, limit,
        )  # fmt: skip
        waiting = list(units)  # not yet submitted
        last_report = time.monotonic()
        while True:
            running = [u for u in units if u.runs and u.state not in FINAL]
            while waiting and len(running) < limit:
                unit = waiting.pop(0)
                _submit(cfg, deployment, unit)
                running.append(unit)
            for unit in running:
                run = client.read_flow_run(unit.runs[-1].id)
                unit.state = run.state.type.value if run.state is not None else "PENDING"
                if unit.state in FINAL - {"COMPLETED"} and len(unit.runs) <= resubmits:
                    logger.warning(
                        "%s: run %s ended %s; submitting it again (%d of runtime.fanout_resubmits=%d)",
                        unit.label, run.name, unit.state, len(unit.runs), resubmits,
                    )  # fmt: skip
                    waiting.insert(0, unit)
            if not waiting and all(u.state in FINAL for u in units):
                break
            if time.monotonic() - last_report > REPORT_SECONDS:
                last_report = time.monotonic()
                logger.info("datagen fan-out: %s", ", ".join(f"{u.label} {u.state.lower()}" for u in units))
            time.sleep(POLL_SECONDS)
    lost = [f"{u.label} ({u.runs[-1].name}: {u.state.lower()})" for u in units if u.state != "COMPLETED"]
    if lost:
        raise UserError(
            f"datagen fan-out: {len(lost)} shard ranges did not complete after runtime.fanout_resubmits={resubmits} "
            f"re-submissions: {', '.join(lost)}. Read those runs' logs, fix the cause and run again (committed "
            "shards come back from the store)."
        )
    logger.info("datagen fan-out: all %d shard ranges completed", len(units))
