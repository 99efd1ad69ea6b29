"""Crash handling around the flows: the attempt bound, and the automations that detect lost runs and
reschedule crashed ones (installed on a real Prefect server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_trm_core.config import load_config


@pytest.mark.usefixtures("prefect_server")
def test_a_flow_run_refuses_to_run_past_its_attempt_bound(tmp_path: Path) -> None:
    from prefect import flow

    from tasks.attempts import TooManyAttemptsError, flow_guard

    cfg = load_config("tiny", [f"store.root=file://{tmp_path}", "runtime.max_flow_attempts=2"])
    calls: list[int] = []

    @flow(retries=5, retry_delay_seconds=0)
    def always_crashing(cfg) -> None:
        with flow_guard(cfg):
            calls.append(1)
            raise RuntimeError("simulated crash")

    state = always_crashing(cfg, return_state=True)
    assert state.is_failed() and len(calls) == 2  # attempts 1 and 2 ran; attempt 3 was refused
    with pytest.raises(TooManyAttemptsError, match=r"failed 2 times, the limit of runtime.max_flow_attempts=2"):
        state.result()


def test_infrastructure_crashes_have_their_own_budget(tmp_path: Path) -> None:
    """Attempts that died without a recorded error (preemption, SIGKILL) do not spend max_flow_attempts;
    max_infra_restarts bounds them, and recorded failures still count against max_flow_attempts."""
    from llm_trm_core.store import ArtifactStore
    from tasks.attempts import TooManyAttemptsError, check_attempts, record_failure, recorded_failures

    store = ArtifactStore(f"file://{tmp_path}")
    cfg = load_config(
        "tiny", [f"store.root={store.root}", "runtime.max_flow_attempts=1", "runtime.max_infra_restarts=3"]
    )
    check_attempts(cfg, store, "run-a", run_count=4)  # three preemptions, no failure: allowed
    with pytest.raises(
        TooManyAttemptsError, match=r"after 4 infrastructure crashes, above runtime.max_infra_restarts=3"
    ):
        check_attempts(cfg, store, "run-a", run_count=5)
    record_failure(store, "run-b", ValueError("bad shard"))
    assert recorded_failures(store, "run-b") == ["ValueError: bad shard"]
    with pytest.raises(TooManyAttemptsError, match=r"failed 1 times.*last error: ValueError: bad shard"):
        check_attempts(cfg, store, "run-b", run_count=2)
    check_attempts(cfg, store, "run-c", run_count=1)  # another run's record is its own


@pytest.mark.usefixtures("prefect_server")
def test_automations_install_idempotently() -> None:
    from prefect.automations import Automation

    from deployments.automations import RESUME, TAG, ZOMBIE, install

    first = install(heartbeat_window=240)
    second = install(heartbeat_window=240)  # replaces, never duplicates
    assert [a.name for a in second] == [ZOMBIE, RESUME] and {a.id for a in first}.isdisjoint({a.id for a in second})
    zombie, resume = Automation.read(name=ZOMBIE), Automation.read(name=RESUME)
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.within.total_seconds() == 240
    assert "prefect.flow-run.heartbeat" in zombie.trigger.after
    assert zombie.actions[0].state == "CRASHED"
    assert resume.trigger.expect == {"prefect.flow-run.Crashed"}
    assert resume.actions[0].state == "SCHEDULED" and resume.actions[0].name == "AwaitingRetry"
    related = resume.trigger.match_related
    related = related[0] if isinstance(related, list) else related
    assert related["prefect.resource.id"] in (f"prefect.tag.{TAG}", [f"prefect.tag.{TAG}"])


def test_reports_link_gcs_artifacts_to_the_cloud_console() -> None:
    from tasks.artifacts import store_link

    assert store_link("gs://bucket/llm-trm/trm/abc") == (
        "[`gs://bucket/llm-trm/trm/abc`](https://console.cloud.google.com/storage/browser/bucket/llm-trm/trm/abc)"
    )
    assert store_link("file:///tmp/store/trm/abc") == "`file:///tmp/store/trm/abc`"
