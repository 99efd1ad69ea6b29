"""A real `prefect server start` on 127.0.0.1 (SQLite, isolated PREFECT_HOME): `prefect deploy`, a process
worker, a flow run created through the REST API the UI uses, SIGKILLed mid-training (a preempted
machine), resumed by `prefect flow-run retry`: finished stages come back cached, the TRM resumes from its
checkpoint, and the final artifacts equal an uninterrupted run's. Its artifacts are visible via the API."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llm_trm_core.config import load_config
from llm_trm_core.store import ArtifactStore
from tests.helpers.prefect_server import create_run, prefect_cli, prefect_server, wait_final, worker

# The runner reports the SIGKILL at once ("Process exited with status code"); the worker then finishes its
# submission of the run, and says so ("Flow run infrastructure exited ...") in some runs only. A retry before
# the submission has finished is skipped as a duplicate, so the test retries after the worker's line or,
# without it, a grace period after the runner's.
PROCESS_EXITED = re.compile(r"Process exited with status code")
WORKER_EXITED = re.compile(r"infrastructure exited with non-zero status")
GRACE_S = 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    with prefect_server(tmp_path) as (api, env):
        yield api, env


@pytest.mark.usefixtures("prefect_server")
def test_deploy_worker_preempted_run_is_resumed_by_retry(server, tmp_path: Path) -> None:
    api, env = server
    root = f"file://{tmp_path / 'store'}"

    prefect_cli(env, "work-pool", "create", "llm-trm-local", "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--name", "pipeline-local")
    # the TRM's checkpoint 2 (the hidden-state pass and evaluation checkpoint per unit too)
    fault = {"LLM_TRM_FAULT_KILL": "trm-checkpoint:2", "LLM_TRM_FAULT_ONCE": str(tmp_path / "killed-once")}
    with worker(env, tmp_path / "worker.log", "--limit", "1", **fault):
        # what the UI's "Run" form posts: a partial config merged onto the preset
        run_id = create_run(api, "pipeline/pipeline-local", {"cfg": {"preset": "tiny", "store": {"root": root}}})
        first = wait_final(api, run_id, 600)
        assert first["state_type"] == "CRASHED", first["state"]  # SIGKILLed at the TRM's checkpoint 2
        assert (tmp_path / "killed-once").exists()
        store = ArtifactStore(root)
        assert store.list_keys("pairs") and not store.list_keys("trm")

        # the worker reports the crash too once the process is reaped; retry after that, or the worker
        # still holds the run as "being submitted" and skips it as a duplicate
        log = tmp_path / "worker.log"
        deadline = time.monotonic() + 120
        while not PROCESS_EXITED.search(log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert PROCESS_EXITED.search(log.read_text()), "the worker's runner never reported the crash"
        grace = time.monotonic() + GRACE_S
        while not WORKER_EXITED.search(log.read_text()) and time.monotonic() < grace:
            time.sleep(0.5)
        prefect_cli(env, "flow-run", "retry", run_id)  # the UI's Retry button does the same
        second = wait_final(api, run_id, 600, previous={"CRASHED"})
        assert second["state_type"] == "COMPLETED", (second["state"], (tmp_path / "worker.log").read_text()[-3000:])
        assert second["run_count"] == 2

        tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        cached = {t["name"].rsplit("-", 1)[0] for t in tasks if t["state"]["name"] == "Cached"}
        assert {"problems", "hiddens", "pairs"} <= cached, cached  # finished stages came back from the cache
        trm = store.read_manifest("trm", store.list_keys("trm")[0])
        assert trm is not None and trm.metrics["training"]["resumed_from"] == 2
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
        assert {"trm-report", "grpo-steps", "evaluate-before-after-grpo"} <= {a["key"] for a in artifacts}

    # the same config, uninterrupted, in another store: identical weights and accuracies
    from flows.pipeline import pipeline

    clean = pipeline(load_config("tiny", [f"store.root=file://{tmp_path / 'clean'}"]))
    other = ArtifactStore(f"file://{tmp_path / 'clean'}")
    for stage in ("trm", "latent", "grpo"):
        a = store.read_manifest(stage, clean[stage]["key"])
        b = other.read_manifest(stage, clean[stage]["key"])
        assert a is not None and b is not None, stage
        weights = [f for f in a.files if f.endswith(".safetensors")]
        assert weights and all(a.files[f].sha256 == b.files[f].sha256 for f in weights), stage
    evaluated = store.read_manifest("evaluate", clean["evaluate"]["key"])
    assert evaluated is not None
    assert [(r["arm"], r["accuracy"]) for r in evaluated.metrics["rows"]] == [
        (r["arm"], r["accuracy"]) for r in clean["evaluate"]["metrics"]["rows"]
    ]


@pytest.mark.slow
def test_scheduled_sweep_fans_out_one_run_per_d_prime(server, tmp_path: Path) -> None:
    """The sweep-nightly deployment starts one sweep-local run per D' through run_deployment (at most
    the deployment's concurrency limit at once), then writes the report over every D'."""
    api, env = server
    root = f"file://{tmp_path / 'store'}"
    prefect_cli(env, "work-pool", "create", "llm-trm-local", "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--name", "sweep-local", "--name", "sweep-nightly")
    with worker(env, tmp_path / "worker.log", "--limit", "3"):
        deployment = httpx.get(f"{api}/deployments/name/sweep-fanout/sweep-nightly").json()
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        cfg = {"preset": "tiny", "store": {"root": root}}
        created = httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": {"cfg": cfg, "deployment": "sweep/sweep-local", "poll_seconds": 1}},
        )
        assert created.status_code == 201, created.text
        parent = wait_final(api, created.json()["id"], 900)
        assert parent["state_type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        subflows = httpx.post(
            f"{api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [parent["id"]]}}}
        ).json()
        point = httpx.get(f"{api}/deployments/name/sweep/sweep-local").json()["id"]
        children = [c for c in subflows if c["deployment_id"] == point]  # (the report is an in-process subflow)
        d_primes = load_config("tiny").sweep.d_primes
        assert sorted(c["parameters"]["cfg"]["sweep"]["d_primes"][0] for c in children) == sorted(d_primes)
        assert all(c["state_type"] == "COMPLETED" for c in children)
        store = ArtifactStore(root)
        covered = [
            {r["d_prime"] for r in store.read_manifest("sweep", k).metrics["rows"]} for k in store.list_keys("sweep")
        ]
        assert set(d_primes) in covered  # one report over every D' (beside each point's own)
        assert len(covered) == len(d_primes) + 1
