"""Prefect caching keyed on the store (records under the store root), leased store locks, and two
concurrent runs of one config computing each stage once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llm_trm_core.config import load_config
from llm_trm_core.locks import StoreLocks
from llm_trm_core.store import ArtifactStore
from tests.helpers.gcs_preconditions import BUCKET as STRICT_BUCKET
from tests.helpers.gcs_preconditions import enforcing_gcs_emulator

REPO = Path(__file__).resolve().parents[1]


def _locks(root: str, lease: float) -> StoreLocks:
    store = ArtifactStore(root)
    return StoreLocks(store.fs, f"{store.base}/_locks", lease=lease)


def test_store_locks_exclude_expire_and_renew(store_root: str) -> None:
    a, b = _locks(store_root, lease=0.8), _locks(store_root, lease=0.8)
    assert a.try_acquire("stage", "A") and a.try_acquire("stage", "A")  # re-entrant for its holder
    assert not b.try_acquire("stage", "B") and not b.acquire("stage", "B", timeout=0.3)
    time.sleep(1.2)  # longer than the lease: A's renewer keeps it alive
    assert b.holder("stage") == "A" and not b.try_acquire("stage", "B")
    with pytest.raises(ValueError, match="not held by B"):
        b.release("stage", "B")
    a.release("stage", "A")
    assert b.acquire("stage", "B", timeout=1.0) and b.holder("stage") == "B"
    b.release("stage", "B")

    # a dead holder (never renews): its lock expires after the lease (judged without the holder's clock) and
    # exactly one of many waiters breaks it. On gs:// against a GCS double that enforces ifGenerationMatch
    # (the plain emulator ignores preconditions, so it could not tell one breaker from several).
    with contextlib.ExitStack() as stack:
        root = store_root
        if store_root.startswith("gs://"):
            stack.enter_context(enforcing_gcs_emulator())
            root = f"gs://{STRICT_BUCKET}/{store_root.rsplit('/', 1)[1]}"
        store = ArtifactStore(root)
        dead = json.dumps({"holder": "X", "expires_at": time.time() + 3600}).encode()
        store.fs.pipe_file(f"{store.base}/_locks/dead.lock", dead)
        winners: list[int] = []
        contenders = [_locks(root, lease=2.0) for _ in range(6)]

        def contend(i: int) -> None:
            if contenders[i].acquire("dead", f"W{i}", timeout=5.0):
                winners.append(i)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1 and _locks(root, 30).holder("dead") == f"W{winners[0]}"
        contenders[winners[0]].release("dead", f"W{winners[0]}")


def _task_states(flow_run_id) -> dict[str, str]:
    """Final state name of each task run; task-run states reach the API through its event pipeline, so
    under load a run may still have no final state just after the flow returned: poll until all do."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    states: dict[str, str] = {}
    for run in runs:
        name = re.sub(r"-[0-9a-f]{3}$", "", run.name)
        states[name if name not in states else f"{name}#2"] = run.state.name if run.state else "None"
    return states


@pytest.mark.usefixtures("prefect_server")
def test_a_config_change_reruns_exactly_that_stage_and_its_dependents(tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    root = f"file://{tmp_path / 'store'}"
    base = load_config("tiny", [f"store.root={root}"])
    first = pipeline(base, return_state=True)
    assert set(_task_states(first.state_details.flow_run_id).values()) == {"Completed"}
    again = pipeline(base, return_state=True)
    assert set(_task_states(again.state_details.flow_run_id).values()) == {"Cached"}
    assert again.result() == first.result()

    changed = pipeline(load_config("tiny", [f"store.root={root}", "grpo.lr=0.0003"]), return_state=True)
    states = _task_states(changed.state_details.flow_run_id)
    recomputed = sorted(name for name, state in states.items() if state != "Cached")
    assert recomputed == ["evaluate-after-grpo", "grpo"], states

    # an artifact deleted from the store is recomputed even though Prefect holds a record for it
    store = ArtifactStore(root)
    trm_key = first.result()["trm"]["key"]
    store.fs.rm(store.path("trm", trm_key), recursive=True)
    healed = pipeline(base, return_state=True)
    states = _task_states(healed.state_details.flow_run_id)
    assert sorted(n for n, s in states.items() if s != "Cached") == ["trm"], states
    assert store.is_committed("trm", trm_key)


def _cli(root: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "-v", "pipeline", "--preset", "tiny", "--store", root],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.usefixtures("prefect_server")
def test_two_concurrent_runs_compute_each_stage_once_and_an_empty_database_hits_the_cache(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    root = f"file://{tmp_path / 'store'}"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    runs = [_cli(root, env), _cli(root, env)]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    store = ArtifactStore(root)
    for stage in ("hiddens", "datagen", "pairs", "trm", "latent", "grpo"):
        commits = sum(len(re.findall(rf"committed {re.escape(root)}/{stage}/", out)) for out in outputs)
        assert commits == 1 == len(store.list_keys(stage)), (stage, commits)
    cached = [len(re.findall(r"Finished in state Cached", out)) for out in outputs]
    assert max(cached) >= 10, cached  # the waiting run read the other's results

    # a fresh Prefect database (new PREFECT_HOME, ephemeral server): every stage comes back cached
    fresh = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    fresh["PREFECT_HOME"] = str(tmp_path / "fresh-prefect-home")
    third = _cli(root, fresh)
    out = third.communicate(timeout=600)[0]
    assert third.returncode == 0, out[-3000:]
    assert "committed" not in out and len(re.findall(r"Finished in state Cached", out)) >= 15, out[-3000:]
    shutil.rmtree(tmp_path / "fresh-prefect-home", ignore_errors=True)
