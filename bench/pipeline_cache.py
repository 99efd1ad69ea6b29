"""First run vs cached re-run of the pipeline flow, and the per-task overhead of a cached re-run.

    ./run python -m bench.pipeline_cache [--preset tiny] [--store file:///tmp/bench-store]

Runs a trivial flow first so Prefect's temporary server start is not counted, then the pipeline twice
on the same store. The second run finds every manifest and recomputes nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from bench.common import emit, log, timer

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow

from flows.pipeline import pipeline
from llm_trm_core.config import load_config
from llm_trm_core.store import ArtifactStore


@flow
def _warm_up() -> int:
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--store", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    root = args.store or f"file://{tempfile.mkdtemp(prefix='bench-pipeline-')}"
    cfg = load_config(args.preset, [f"store.root={root}"])
    with timer() as t:
        _warm_up()
    emit("prefect_server_start", t[0], "s", note="temporary server + first flow run")
    log(f"first run on {root} ...")
    with timer() as first:
        result = pipeline(cfg)
    with timer() as again:
        cached = pipeline(cfg)
    assert cached == result, "the cached re-run returned different manifests"
    tasks = len(result) + sum(1 for k in result["datagen"]["upstream"] if k.startswith("shard-"))
    emit("pipeline_first_run", first[0], "s", preset=args.preset, tasks=tasks)
    emit("pipeline_cached_rerun", again[0], "s", preset=args.preset, tasks=tasks)
    emit("cached_rerun_ratio", again[0] / first[0], "fraction of first run", preset=args.preset)
    emit("cached_task_overhead", again[0] / tasks * 1000, "ms per task", preset=args.preset)
    # without Prefect's cache records (a new store prefix for them, or records deleted): every task runs,
    # finds its committed manifest in the store and returns it
    store = ArtifactStore(root)
    store.fs.rm(f"{store.base}/_prefect/cache-keys", recursive=True)
    with timer() as bare:
        assert pipeline(cfg) == result
    emit("rerun_without_prefect_records", bare[0], "s", preset=args.preset, tasks=tasks)
    emit("store_only_task_overhead", bare[0] / tasks * 1000, "ms per task", preset=args.preset)


if __name__ == "__main__":
    main()
