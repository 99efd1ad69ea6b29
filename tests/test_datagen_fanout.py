"""Datagen fanned out over a work pool (flows/datagen_fanout.py, flows/fanout.py), on real parts: `prefect server start`
(SQLite, isolated home), the `datagen-shards-local` deployment, three process workers on one pool, and the
CLI's `llm-trm datagen` with `runtime.fanout_deployment` set. The first shard-range run to publish a
generation part is SIGKILLed there (a preempted worker, llm_trm_core/faults.py); the caller re-submits that
range, which resumes from the store, and the other ranges run once. The artifacts (keys and file digests)
equal those of the same config run in one process without Prefect. A deployment that does not exist is one
`error:` line and exit 2. Without a server: the graph fans out before its shard tasks, and the caller's
loop keeps at most `runtime.fanout_workers` ranges in flight and gives up after `runtime.fanout_resubmits`."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_trm_core.config import load_config
from llm_trm_core.stages.graph import run_plain
from llm_trm_core.store import ArtifactStore
from tests.helpers.prefect_server import REPO, prefect_cli, prefect_server, worker

DEPLOYMENT = "datagen-shards/datagen-shards-local"


def _cli(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "datagen", "--preset", "tiny", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _files(store: ArtifactStore, stage: str) -> dict[str, dict[str, str]]:
    """Every committed artifact of `stage`: key -> {file: sha256}."""
    out = {}
    for key in store.list_keys(stage):
        manifest = store.read_manifest(stage, key)
        assert manifest is not None, (stage, key)
        out[key] = {name: entry.sha256 for name, entry in manifest.files.items()}
    return out


def _runs_of(api: str, deployment_id: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    return list(httpx.post(f"{api}/flow_runs/filter", json=body).json())


@pytest.mark.slow  # ~3 min on 2 busy cores
def test_datagen_fanned_out_over_three_workers_survives_a_killed_worker(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    once = tmp_path / "killed-once"
    fanout = [f"runtime.fanout_deployment={DEPLOYMENT}", "runtime.fanout_workers=3"]
    with prefect_server(tmp_path) as (api, env):
        prefect_cli(env, "work-pool", "create", "llm-trm-local", "--type", "process")
        prefect_cli(env, "--no-prompt", "deploy", "--name", "datagen-shards-local")
        fault = {"LLM_TRM_FAULT_KILL": "datagen-part:1", "LLM_TRM_FAULT_ONCE": str(once)}
        with ExitStack() as workers:
            for i in range(3):
                workers.enter_context(
                    worker(env, tmp_path / f"worker-{i}.log", "--name", f"worker-{i}", "--limit", "1", **fault)
                )
            started = time.monotonic()
            done = _cli(env, "--store", root, *fanout)
            seconds = time.monotonic() - started
            logs = "".join((tmp_path / f"worker-{i}.log").read_text()[-1500:] for i in range(3))
            assert done.returncode == 0, (done.stderr[-3000:], logs)
        print(f"fanned-out datagen with a killed worker: {seconds:.0f} s")  # shown with -s
        assert once.exists()  # the fault fired: one range run was SIGKILLed after its first part

        deployment_id = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}").json()["id"]
        runs = _runs_of(api, deployment_id)
        by_range: dict[str, list[dict[str, Any]]] = {}
        for run in sorted(runs, key=lambda r: r["name"]):
            by_range.setdefault(run["name"].rsplit("-try", 1)[0], []).append(run)
        assert sorted(by_range) == ["datagen-shards-0-0", "datagen-shards-1-1", "datagen-shards-2-2"], by_range
        states = {name: [r["state_type"] for r in rs] for name, rs in by_range.items()}
        assert sorted(states.values()) == [["COMPLETED"], ["COMPLETED"], ["CRASHED", "COMPLETED"]], states

        # the re-submitted range resumed: its shard continued after the part the killed run had published
        (resumed,) = [rs[-1] for rs in by_range.values() if len(rs) == 2]
        logs_body = {"logs": {"flow_run_id": {"any_": [resumed["id"]]}}}
        messages = [entry["message"] for entry in httpx.post(f"{api}/logs/filter", json=logs_body).json()]
        assert any("resuming at problem index" in m for m in messages), messages[-20:]

        # the caller's own shard tasks found every shard committed by the range runs
        parent_task = httpx.get(f"{api}/task_runs/{resumed['parent_task_run_id']}").json()
        body = {"flow_runs": {"id": {"any_": [parent_task["flow_run_id"]]}}}
        tasks = httpx.post(f"{api}/task_runs/filter", json=body).json()
        shard_states = [t["state"]["name"] for t in tasks if t["name"].startswith("datagen-shard-")]
        assert shard_states == ["Cached"] * 3, [(t["name"], t["state"]["name"]) for t in tasks]

        # run again: every range is committed, so no range run is submitted
        again = _cli(env, "--store", root, *fanout)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(_runs_of(api, deployment_id)) == len(runs) == 4

        # bad input: a deployment that does not exist is one error line, exit 2
        bad = _cli(env, "--store", root, "runtime.fanout_deployment=datagen-shards/nowhere", timeout=300)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-3000:]
        assert lines[0].startswith("error: runtime.fanout_deployment=datagen-shards/nowhere: no such deployment")

    # the same config in one process without Prefect, in another store: the same artifacts, byte for byte
    reference = f"file://{tmp_path / 'reference'}"
    run_plain(load_config("tiny", [f"store.root={reference}"]), "datagen")
    for stage in ("datagen-shard", "datagen"):
        fanned, single = _files(ArtifactStore(root), stage), _files(ArtifactStore(reference), stage)
        assert fanned and fanned == single, stage


class _Recorder:
    """A graph call that records what it is asked and returns stand-in manifests (nothing runs)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, task: str, cfg: Any, /, *inputs: Any, **options: Any) -> dict[str, Any]:
        self.calls.append((task, *inputs[1:]) if task == "datagen-shard" else task)
        return {"stage": task, "key": task, "uri": "", "upstream": {}, "metrics": {"total": 24, "shard": 0}}


class _FanningRecorder(_Recorder):
    def fan_out_shards(self, cfg: Any, problems: dict[str, Any], ranges: list[tuple[int, int]]) -> None:
        self.calls.append(("fan-out", ranges))


def test_the_graph_fans_shard_ranges_out_before_its_shard_tasks(caplog: pytest.LogCaptureFixture) -> None:
    from llm_trm_core.stages.graph import datagen, shard_ranges

    assert shard_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)] and shard_ranges(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert shard_ranges(2, 5) == [(0, 1), (1, 2)] and shard_ranges(3, 1) == [(0, 3)]
    shards = [("datagen-shard", 0, 0, 8), ("datagen-shard", 1, 8, 16), ("datagen-shard", 2, 16, 24)]

    call = _FanningRecorder()
    datagen(call, load_config("tiny", [f"runtime.fanout_deployment={DEPLOYMENT}", "runtime.fanout_workers=2"]))
    assert call.calls == ["problems", ("fan-out", [(0, 2), (2, 3)]), *shards, "datagen-report"]

    unset = _FanningRecorder()  # the default: no fan-out, the same shard tasks
    datagen(unset, load_config("tiny"))
    assert unset.calls == ["problems", *shards, "datagen-report"]

    plain = _Recorder()  # a call without Prefect (llm-trm stage) runs every shard itself, and says so
    datagen(plain, load_config("tiny", [f"runtime.fanout_deployment={DEPLOYMENT}"]))
    assert plain.calls == ["problems", *shards, "datagen-report"]
    assert "applies to the Prefect flows only" in caplog.text


def test_fan_out_keeps_the_limit_and_gives_up_after_the_resubmissions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every range run crashes: each range is submitted 1 + fanout_resubmits times, never more than
    fanout_workers at once, then one UserError names the ranges."""
    from types import SimpleNamespace

    import flows.datagen_fanout as datagen_fanout
    import flows.fanout as fanout
    from llm_trm_core.errors import UserError

    submitted: list[str] = []
    polls: dict[str, int] = {}
    in_flight: list[int] = []

    def run_deployment(name: str, parameters: dict[str, Any], flow_run_name: str, **_: Any) -> Any:
        assert name == DEPLOYMENT and parameters["cfg"]["runtime"]["fanout_workers"] == 2
        submitted.append(flow_run_name)
        return SimpleNamespace(id=flow_run_name, name=flow_run_name)

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read_flow_run(self, run_id: str) -> Any:
            polls[run_id] = polls.get(run_id, 0) + 1
            live = [r for r in submitted if polls.get(r, 0) < 2]
            in_flight.append(len(live))
            state = "RUNNING" if polls[run_id] < 2 else "CRASHED"
            return SimpleNamespace(name=run_id, state=SimpleNamespace(type=SimpleNamespace(value=state)))

    monkeypatch.setattr(fanout, "run_deployment", run_deployment)
    monkeypatch.setattr(fanout, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(fanout, "check_deployment", lambda client, name, setting: "llm-trm-local")
    monkeypatch.setattr(fanout, "POLL_SECONDS", 0.0)
    monkeypatch.setattr(datagen_fanout, "shards_committed", lambda cfg, problems, first, end: first == 3)  # 3 done
    cfg = load_config("tiny", [f"runtime.fanout_deployment={DEPLOYMENT}", "runtime.fanout_workers=2"])
    with pytest.raises(UserError, match=r"3 shard ranges did not complete after runtime.fanout_resubmits=2"):
        datagen_fanout.fan_out_shards(cfg, {}, [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert sorted(submitted) == sorted(f"datagen-shards-{i}-{i}-try{t}" for i in range(3) for t in (1, 2, 3))
    assert max(in_flight) <= 2
