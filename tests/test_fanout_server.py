"""The corpus hidden-state pass and the evaluation fanned out over a work pool (flows/fanout.py), on real
parts: `prefect server start` (SQLite, isolated home), the `hiddens-parts-local` and `evaluate-chunks-local`
deployments, two process workers on one pool, and the CLI's `llm-trm evaluate` with both settings. The
first unit run to commit a checkpoint (hidden-state part 0, after its first unit) is SIGKILLed there (a
preempted worker); the caller re-submits it, the new run computes only the unit the lost one had not
committed (its second), and the artifacts equal those of the same config run in one process without
Prefect: the hidden states byte for byte, the evaluation's answers apart from their timings."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_trm_core.config import load_config
from llm_trm_core.stages.graph import run_plain
from llm_trm_core.store import ArtifactStore
from tests.helpers.prefect_server import REPO, prefect_cli, prefect_server, worker

HIDDENS = "hiddens-parts/hiddens-parts-local"
EVALUATE = "evaluate-chunks/evaluate-chunks-local"
CONFIG = ["evaluate.batch_size=2"]  # the tiny preset's test problems in 4 chunks


def _runs(api: str, deployment: str) -> dict[str, list[dict[str, Any]]]:
    """Run name without its "-try<n>" -> its tries, in order."""
    deployment_id = httpx.get(f"{api}/deployments/name/{deployment}").json()["id"]
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    out: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(httpx.post(f"{api}/flow_runs/filter", json=body).json(), key=lambda r: r["name"]):
        out.setdefault(run["name"].rsplit("-try", 1)[0], []).append(run)
    return out


def _states(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    return {name: [r["state_type"] for r in tries] for name, tries in runs.items()}


def _untimed_answers(store: ArtifactStore, key: str) -> Any:
    answers = json.loads(store.open("evaluate", key).read_bytes("answers.json"))
    return {arm: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for arm, rows in answers.items()}


@pytest.mark.slow  # 4 to 8 min on 2 busy cores
def test_hidden_states_and_evaluation_fanned_out_survive_a_killed_worker(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    once = tmp_path / "killed-once"
    fanout = [f"runtime.fanout_hiddens_deployment={HIDDENS}", f"runtime.fanout_evaluate_deployment={EVALUATE}"]
    with prefect_server(tmp_path) as (api, env):
        prefect_cli(env, "work-pool", "create", "llm-trm-local", "--type", "process")
        prefect_cli(env, "--no-prompt", "deploy", "--name", "hiddens-parts-local")
        prefect_cli(env, "--no-prompt", "deploy", "--name", "evaluate-chunks-local")
        fault = {"LLM_TRM_FAULT_KILL": "checkpoint:1", "LLM_TRM_FAULT_ONCE": str(once)}
        with ExitStack() as workers:
            for i in range(2):
                workers.enter_context(
                    worker(env, tmp_path / f"worker-{i}.log", "--name", f"worker-{i}", "--limit", "1", **fault)
                )
            done = subprocess.run(
                [sys.executable, "-m", "flows.cli", "evaluate", "--preset", "tiny", "--store", root, *CONFIG, *fanout,
                 "runtime.fanout_workers=2"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
            )  # fmt: skip
            logs = "".join((tmp_path / f"worker-{i}.log").read_text()[-1500:] for i in range(2))
            assert done.returncode == 0, (done.stderr[-3000:], logs)
        assert once.exists()  # the fault fired: a unit run was SIGKILLed after its first checkpoint

        hiddens_runs = _runs(api, HIDDENS)
        assert _states(hiddens_runs) == {
            "hiddens-part-0-of-2": ["CRASHED", "COMPLETED"], "hiddens-part-1-of-2": ["COMPLETED"]
        }  # fmt: skip
        evaluate_runs = _states(_runs(api, EVALUATE))
        assert evaluate_runs == {"evaluate-chunks-0-1": ["COMPLETED"], "evaluate-chunks-2-3": ["COMPLETED"]}
        resumed = hiddens_runs["hiddens-part-0-of-2"][-1]
        body = {"logs": {"flow_run_id": {"any_": [resumed["id"]]}}, "sort": "TIMESTAMP_DESC"}
        messages = [entry["message"] for entry in httpx.post(f"{api}/logs/filter", json=body).json()]
        units = [m for m in messages if m.startswith("hidden states:")]
        # the lost run had committed unit 1 of its two: the new run computed unit 2 only
        assert any(m.endswith("units committed already") for m in units), units
        assert [m for m in units if m.endswith("sequences)")] == [
            "hidden states: unit 2 of 3 committed (128 sequences)"
        ]

    reference = f"file://{tmp_path / 'reference'}"
    run_plain(load_config("tiny", [f"store.root={reference}", *CONFIG]), "evaluate")
    fanned, single = ArtifactStore(root), ArtifactStore(reference)
    (key,) = single.list_keys("hiddens")
    a, b = (s.read_manifest("hiddens", key) for s in (fanned, single))
    assert a is not None and b is not None
    assert {n: e.sha256 for n, e in a.files.items()} == {n: e.sha256 for n, e in b.files.items()}
    (key,) = single.list_keys("evaluate")
    assert fanned.list_keys("evaluate") == [key] and _untimed_answers(fanned, key) == _untimed_answers(single, key)
