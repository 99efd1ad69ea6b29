"""Several workers, as the README sets them up: `prefect server` on a real PostgreSQL (Debian's package, started
here on 127.0.0.1), the project's deploy command, two process workers sharing one store. Two runs submitted
together are taken by different workers; the stages they share are computed once (the other run waits on the
store lock, then reads the cache) and each run's own stage is computed by its run."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from llm_trm_core.store import ArtifactStore
from tests.helpers.prefect_server import create_run, deploy, postgres, prefect_server, wait_final, worker


def test_two_workers_on_a_postgres_server_share_the_work_and_the_store(tmp_path: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    with postgres() as database_url, prefect_server(tmp_path, database_url) as (api, env):
        assert httpx.get(f"{api}/admin/version").status_code == 200
        deploy(env)
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        with (
            worker(env, logs[0], "--name", "worker-a", "--limit", "1"),
            worker(env, logs[1], "--name", "worker-b", "--limit", "1"),
        ):
            runs = [
                create_run(
                    api,
                    "compressor/compressor-local",
                    {"cfg": {"preset": "tiny", "store": {"root": root}, "compressor": {"d_prime": d}}},
                )
                for d in (8, 32)
            ]
            finals = [wait_final(api, run, 600) for run in runs]
        assert [f["state_type"] for f in finals] == ["COMPLETED", "COMPLETED"], [f["state"] for f in finals]

    # each worker executed exactly one of the two runs (a worker may also try a run the other took first:
    # the server aborts that submission)
    taken = [set(re.findall(r"/runs/flow-run/([0-9a-f-]{36})", log.read_text())) & set(runs) for log in logs]
    assert taken[0] and taken[1] and taken[0] | taken[1] == set(runs) and not taken[0] & taken[1], taken

    store = ArtifactStore(root)
    assert len(store.list_keys("hiddens")) == 1 and len(store.list_keys("basis")) == 1  # shared: computed once
    d_primes = sorted(
        store.read_manifest("compressor", k).config["compressor"]["d_prime"] for k in store.list_keys("compressor")
    )  # type: ignore[union-attr]
    assert d_primes == [8, 32]
