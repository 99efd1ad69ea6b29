"""Bounded attempts per flow run: the resume-crashed automation reschedules a Crashed run with no
counter of its own, so the flow refuses to start once it has run `runtime.max_flow_attempts` times
(it then ends Failed, which no automation retries)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.runtime import flow_run

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.preflight import preflight
from tasks.artifacts import publish_config
from tasks.logs import core_logs_to_prefect


class TooManyAttemptsError(UserError):
    pass


def check_attempts(max_attempts: int) -> None:
    count = int(flow_run.run_count or 1)
    if count > max_attempts:
        raise TooManyAttemptsError(
            f"flow run {flow_run.name} ({flow_run.id}) is on attempt {count}, above runtime.max_flow_attempts="
            f"{max_attempts}: it keeps crashing. Inspect its logs, fix the cause, then start a new run "
            "(finished stages come back from the cache)."
        )


@contextmanager
def flow_guard(cfg: PipelineConfig, command: str = "pipeline") -> Iterator[None]:
    """Enter every flow through this: the attempt bound, core logs routed to the run's log, the plan,
    store and model preflight of `command` (its stages: llm_trm_core.plan.COMMAND_STAGES), so a run
    submitted from the UI or a deployment is refused with the same one-line message as the CLI before any
    task takes a lock or loads a model; then the resolved config is published on the run's page."""
    check_attempts(cfg.runtime.max_flow_attempts)
    with core_logs_to_prefect():
        preflight(cfg, command)
        publish_config(cfg)
        yield
