"""Datagen fanned out over workers (flows/datagen_fanout.py): measured wall time on the tiny preset (CPU) with
1 and 3 process workers, and the speed-up the GPU cost model expects on N GPUs for the smollm3-3b preset.

    ./run python -m bench.datagen_fanout                 # both parts
    ./run python -m bench.datagen_fanout --model-only    # only the cost-model estimate (no server, seconds)

Measured: a real `prefect server` (isolated home, SQLite), the `datagen-shards-local` deployment, W process
workers (`--limit 1` each), and `llm-trm datagen --preset tiny runtime.fanout_deployment=...
runtime.fanout_workers=W` timed from the command's start to its exit, each W on a fresh store; beside it
the same command without fan-out (one process). The tiny preset has 3 shards of 8 problems and a model
that generates in well under a second per batch, so each range run's fixed cost (a new process importing
torch and Prefect, loading the model, the worker's 2 s poll) dominates; on a machine with fewer cores
than workers the three range runs also compete for the CPU. The figure shows that the mechanism works
and what it costs, not the GPU speed-up.

Estimated (bench/gpu_cost_model.py): datagen's hours on one 80 GB card for the smollm3-3b preset; with N
GPUs the shards are cut into N ranges, so the slowest range has ceil(S/N) of the S shards, plus a fixed
per-run cost (`--overhead-s`: container start and model load, an assumption, not a measurement). The
pipeline speed-up replaces only datagen's time (Amdahl): the other stages still run on one GPU.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import emit, log
from bench.gpu_cost_model import CARDS, estimate, model_shapes, seconds_on
from llm_trm_core.config import load_config

DEPLOYMENT = "datagen-shards/datagen-shards-local"
CARD = "80GB (H100 SXM)"


def _datagen(env: dict[str, str], store: Path, *overrides: str) -> float:
    """Seconds `llm-trm datagen --preset tiny` takes on a fresh store (RuntimeError if it fails)."""
    from tests.helpers.prefect_server import REPO

    command = [sys.executable, "-m", "flows.cli", "datagen", "--preset", "tiny", "--store", f"file://{store}"]
    start = time.perf_counter()
    done = subprocess.run([*command, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"llm-trm datagen failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def measure(workers: list[int]) -> None:
    from tests.helpers.prefect_server import prefect_cli, prefect_server, worker

    tmp = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    cfg = load_config("tiny")
    shards = math.ceil(cfg.datagen.num_problems / cfg.datagen.shard_size)
    with prefect_server(tmp) as (_, env):
        prefect_cli(env, "work-pool", "create", "llm-trm-local", "--type", "process")
        prefect_cli(env, "--no-prompt", "deploy", "--name", "datagen-shards-local")
        # warm the model cache and the server once, outside the timings
        _datagen(env, tmp / "warm")
        seconds = _datagen(env, tmp / "in-process")
        log(f"in one process (no fan-out): {seconds:.1f} s")
        emit("datagen_tiny_in_process", seconds, "s", shards=shards)
        for count in workers:
            with ExitStack() as stack:
                for i in range(count):
                    stack.enter_context(worker(env, tmp / f"w{count}-{i}.log", "--name", f"w{i}", "--limit", "1"))
                overrides = [f"runtime.fanout_deployment={DEPLOYMENT}", f"runtime.fanout_workers={count}"]
                seconds = _datagen(env, tmp / f"fanout-{count}", *overrides)
            log(f"fanned out over {count} workers: {seconds:.1f} s")
            emit("datagen_tiny_fanout", seconds, "s", workers=count, shards=shards)


def expected(gpus: list[int], overhead_s: float, problems: list[int]) -> None:
    shapes = model_shapes()
    for count in problems:
        cfg = load_config("smollm3-3b", [f"datagen.num_problems={count}"])
        rows = {r.stage: seconds_on(r, CARDS[CARD]) for r in estimate(cfg, shapes)}
        datagen, total = rows["datagen"], sum(rows.values())
        shards = math.ceil(count / cfg.datagen.shard_size)
        one = datagen + overhead_s
        for n in gpus:
            with_n = datagen * math.ceil(shards / n) / shards + overhead_s
            pipeline = (total + overhead_s) / (total - datagen + with_n)
            log(
                f"smollm3-3b, {count} problems ({shards} shards), {n} GPUs: datagen {with_n / 3600:.2f} h "
                f"(x{one / with_n:.2f}), pipeline x{pipeline:.2f}"
            )
            emit(
                "datagen_fanout_expected_speedup", one / with_n, "x", gpus=n, problems=count, shards=shards,
                card=CARD, datagen_hours=with_n / 3600, pipeline_speedup=pipeline, overhead_s=overhead_s,
                estimate=True,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-only", action="store_true", help="only the cost-model estimate")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3], help="worker counts to measure")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 10], help="GPU counts to estimate")
    parser.add_argument("--problems", type=int, nargs="+", default=[1000, 8000], help="datagen.num_problems")
    parser.add_argument("--overhead-s", type=float, default=120.0, help="assumed fixed cost of one range run")
    args = parser.parse_args(argv)
    if not args.model_only:
        measure(args.workers)
    expected(args.gpus, args.overhead_s, args.problems)


if __name__ == "__main__":
    main()
