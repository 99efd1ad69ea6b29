"""Two bounds per flow run, one for each way an attempt can end early.

- **Failures**: the pipeline raised an error (a bug, bad data, a stage that cannot converge). `flow_guard`
  records each one in the store (`_prefect/attempts/<flow run id>.json`) before the error leaves the flow;
  once `runtime.max_flow_attempts` attempts have failed, the next one is refused and the run ends Failed,
  which neither Prefect's retries nor the resume-crashed automation (deployments/automations.py) retry.
- **Infrastructure crashes**: the attempt died without raising (spot preemption, SIGKILL, lost heartbeat,
  OOM kill), so nothing was recorded. They are the attempts Prefect counted (`flow_run.run_count`) that are
  not recorded failures, bounded separately by `runtime.max_infra_restarts`: a preempted run resumes from
  the store as often as that allows without spending the failure budget, and a run whose machine keeps
  dying still stops.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.runtime import flow_run

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.preflight import preflight
from llm_trm_core.store import ArtifactStore
from tasks.artifacts import publish_config
from tasks.caching import PREFECT_DIR
from tasks.logs import core_logs_to_prefect

logger = logging.getLogger(__name__)

ATTEMPTS_DIR = f"{PREFECT_DIR}/attempts"  # beside Prefect's cache records and locks in the store


class TooManyAttemptsError(UserError):
    pass


def _record_path(store: ArtifactStore, run_id: str) -> str:
    return f"{store.base}/{ATTEMPTS_DIR}/{run_id}.json"


def recorded_failures(store: ArtifactStore, run_id: str) -> list[str]:
    """The errors recorded for earlier attempts of flow run `run_id` (oldest first)."""
    path = _record_path(store, run_id)
    try:
        return list(json.loads(store.fs.cat_file(path))["failures"])
    except FileNotFoundError:
        return []


def record_failure(store: ArtifactStore, run_id: str, error: BaseException) -> None:
    """Append this attempt's error to the run's record (a store that cannot take it only loses the count)."""
    try:
        failures = [*recorded_failures(store, run_id), f"{type(error).__name__}: {error}"[:500]]
        path = _record_path(store, run_id)
        store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        store.fs.pipe_file(path, json.dumps({"failures": failures}).encode())
    except Exception as exc:  # the original error matters more than its count
        logger.warning("could not record the failure of flow run %s in %s: %s", run_id, store.root, exc)


def check_attempts(cfg: PipelineConfig, store: ArtifactStore, run_id: str, run_count: int) -> None:
    """Refuse attempt number `run_count` of flow run `run_id` when either budget is spent."""
    failures = recorded_failures(store, run_id)
    crashes = max(0, run_count - 1 - len(failures))
    runtime = cfg.runtime
    if len(failures) >= runtime.max_flow_attempts:
        raise TooManyAttemptsError(
            f"flow run {flow_run.name} ({run_id}) already failed {len(failures)} times, the limit of "
            f"runtime.max_flow_attempts={runtime.max_flow_attempts} (last error: {failures[-1]}). Fix the cause, "
            "then start a new run (finished stages come back from the cache)."
        )
    if crashes > runtime.max_infra_restarts:
        raise TooManyAttemptsError(
            f"flow run {flow_run.name} ({run_id}) was restarted after {crashes} infrastructure crashes, above "
            f"runtime.max_infra_restarts={runtime.max_infra_restarts}: its machines keep dying (preemption, "
            "out of memory, lost heartbeat). Check the worker's logs and the node's events, then start a new "
            "run or raise runtime.max_infra_restarts."
        )
    if run_count > 1:
        logger.info(
            "flow run attempt %d: %d earlier failures (limit %d), %d infrastructure restarts (limit %d)",
            run_count, len(failures), runtime.max_flow_attempts, crashes, runtime.max_infra_restarts,
        )  # fmt: skip


@contextmanager
def flow_guard(cfg: PipelineConfig, command: str = "pipeline") -> Iterator[None]:
    """Enter every flow through this: core logs routed to the run's log, the plan, store and model preflight
    of `command` (its stages: llm_trm_core.plan.COMMAND_STAGES), so a run submitted from the UI or a
    deployment is refused with the same one-line message as the CLI before any task takes a lock or loads a
    model; the two attempt bounds (module docstring); the resolved config published on the run's page; and
    an error raised by the flow's body recorded as a failure of this attempt."""
    with core_logs_to_prefect():
        preflight(cfg, command)
        store = ArtifactStore(cfg.store.root)
        run_id = str(flow_run.id)
        check_attempts(cfg, store, run_id, int(flow_run.run_count or 1))
        publish_config(cfg)
        try:
            yield
        except Exception as exc:  # not BaseException: a termination signal is the infrastructure's doing
            record_failure(store, run_id, exc)
            raise
