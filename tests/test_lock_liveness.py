"""A lock whose holder is known dead is broken at once (no wait for the lease); a live holder never is."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_trm_core.locks import StoreLocks, host_id
from llm_trm_core.store import ArtifactStore

HOLD = """
import sys, time
from llm_trm_core.locks import StoreLocks
from llm_trm_core.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
locks = StoreLocks(store.fs, f"{store.base}/_locks", lease=120)
assert locks.try_acquire("stage", "child")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _locks(root: str, **kw: object) -> StoreLocks:
    store = ArtifactStore(root)
    return StoreLocks(store.fs, f"{store.base}/_locks", lease=120, **kw)  # type: ignore[arg-type]


def _holding_child(root: str, seconds: float) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, root, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_lock_whose_process_died_on_this_host_is_broken_at_once(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    child = _holding_child(root, 600)
    waiter = _locks(root, is_dead=lambda record: True)  # even a hook that says "dead" cannot break a live process
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert not waiter.try_acquire("stage", "me")
        time.sleep(0.1)
    assert waiter.holder("stage") == "child"

    child.kill()  # SIGKILL: no release, no more renewals; its 120 s lease has barely started
    child.wait()
    started = time.monotonic()
    assert waiter.acquire("stage", "me", timeout=5)
    assert time.monotonic() - started < 2
    record = json.loads((tmp_path / "store" / "_locks" / "stage.lock").read_text())
    assert record["holder"] == "me" and record["host"] == host_id() and record["pid"] > 0
    waiter.release("stage", "me")


def test_a_holder_on_another_host_is_judged_by_the_hook_only(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    store = ArtifactStore(root)
    record = {"holder": "far", "expires_at": time.time() + 120, "host": "elsewhere", "pid": 1, "flow_run_id": "x"}
    store.fs.makedirs(f"{store.base}/_locks", exist_ok=True)
    store.fs.pipe_file(f"{store.base}/_locks/stage.lock", json.dumps(record).encode())
    assert not _locks(root).try_acquire("stage", "me")  # no hook: wait for the lease
    assert not _locks(root, is_dead=lambda r: False).try_acquire("stage", "me")
    assert _locks(root, is_dead=lambda r: r["flow_run_id"] == "x").try_acquire("stage", "me")


@pytest.mark.usefixtures("prefect_server")
def test_prefect_breaks_locks_of_ended_runs_and_earlier_attempts_only(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from tasks.caching import StoreLockManager
    from tasks.liveness import lock_holder_ended, lock_owner

    @flow(name="liveness-probe")
    def probe() -> dict[str, object]:
        mine = lock_owner()
        return {
            "owner": mine,
            "earlier_attempt": lock_holder_ended({**mine, "run_count": int(str(mine["run_count"])) - 1}),
            "this_attempt": lock_holder_ended(mine),
        }

    seen = probe()
    assert seen["earlier_attempt"] is True and seen["this_attempt"] is False

    root = f"file://{tmp_path / 'store'}"
    store = ArtifactStore(root)
    manager = StoreLockManager(root)
    with get_client(sync_client=True) as client:
        deployment_less = client.create_flow_run(probe, state=Running())
        for state, breakable in ((Running(), False), (Crashed(), True)):
            client.set_flow_run_state(deployment_less.id, state, force=True)
            record = {
                "holder": "far", "expires_at": time.time() + 120, "host": "another-machine", "pid": 7,
                "flow_run_id": str(deployment_less.id), "run_count": 1,
            }  # fmt: skip
            store.fs.makedirs(manager.locks.folder, exist_ok=True)
            store.fs.pipe_file(f"{manager.locks.folder}/k.lock", json.dumps(record).encode())
            time.sleep(5.1)  # past the state cache of tasks.liveness
            assert manager.acquire_lock("k", "me", acquire_timeout=1.0) is breakable, state.type
        manager.release_lock("k", "me")
