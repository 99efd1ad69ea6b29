"""Shard read throughput beside `torch.load` on the same tensors, and peak memory while streaming.

    ./run python -m bench.shard_io [--hidden-size 576] [--rows-per-shard 8192] [--d-prime 64] [--pre-len 80]

Two artifacts are written into a temporary file:// store with the project's own writers, in the
project's format (zstd, page checksums): a hidden-states artifact (`ShardedStatesWriter`, 8 shards of
--rows-per-shard rows of D = --hidden-size float32) and a pairs artifact (8 files of 256 pairs, pre of
--pre-len positions and post, D' = --d-prime). The same tensors are also `torch.save`d, one file per
shard (hidden states: one (rows, D) tensor; pairs: the flat pre tensor, its lengths and the post
tensor), so `torch.load` reads exactly the bytes of float data that our readers return.

Figures (MB/s of float32 tensor bytes returned, 1 MB = 1e6 bytes, fastest of --repeats passes, files in
the page cache):
- torch_load: `torch.load` of every shard file;
- hidden_read: `HiddenStates.read_shard` of every shard, verified (sha256 of the whole file against the
  manifest, then Parquet page checksums) and unverified (the file read straight from the filesystem,
  no page checksums, the same table-to-tensor conversion);
- pair_read: every pair of every file through `PairsReader.iter_pairs`, verified and unverified likewise;
- sha256 alone over the same files, to show what verification costs.
What limits the Parquet figures (measured on this 2-core machine, one 37.7 MB shard of D = 576 float32):
the table-to-tensor step is a zero-copy view now (`llm_trm_core.arrow.column_rows`), so nearly all the time
is Parquet decoding. Reading the `state` column alone runs at ~530-650 MB/s as written (zstd, a list column:
a repetition and a definition level are decoded per float); without compression ~1200 MB/s; as
fixed_size_binary(4·D) with no compression ~9800 MB/s unverified and ~3200 MB/s with page checksums. sha256
of the file runs at ~1000-1900 MB/s. So verified reads stay bounded by sha256 below torch.load whatever the
layout, and unverified ones would need another written format (a store-key change for every stage that
writes states) to reach torch.load.
Peak RSS: a fresh process streams 1 and then 8 shards through `HiddenStates.iter_batches` and
`PairData.iter_batches`; flat memory means the 8-shard peak is close to the 1-shard peak.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import emit, log
from llm_trm_core.arrow import STATE_WRITE_OPTIONS
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import pairs_to_table, table_to_pairs
from llm_trm_core.hidden_states import META_FILE as HIDDEN_META
from llm_trm_core.hidden_states import HiddenStates, ShardedStatesWriter, states_from_table
from llm_trm_core.store import Artifact, ArtifactStore
from llm_trm_core.trm.data import PairData
from llm_trm_core.trm.pairs import META_FILE as PAIRS_META
from llm_trm_core.trm.pairs import PAIRS_STAGE, SCHEMA_NAME, SCHEMA_VERSION, PairsReader, pairs_schema

SHARDS = 8
PAIRS_PER_FILE = 256


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_hidden(store: ArtifactStore, hidden_size: int, rows: int, tmp: Path) -> tuple[Artifact, list[Path]]:
    rng = np.random.default_rng(0)
    key = uuid.uuid4().hex
    saved = []
    with store.writer("hiddens-bench", key, config={}, code_version="0") as w:
        sharded = ShardedStatesWriter(w, hidden_size, "float32", rows)
        for i in range(SHARDS):
            states = torch.from_numpy(rng.standard_normal((rows, hidden_size), dtype=np.float32))
            sharded.add("train", f"doc{i}", np.arange(rows), states)
            path = tmp / f"hidden-{i}.pt"
            torch.save(states.clone(), path)
            saved.append(path)
        sharded.close()
        w.commit()
    return store.open("hiddens-bench", key), saved


def write_pairs(store: ArtifactStore, d_prime: int, pre_len: int, tmp: Path) -> tuple[PairsReader, list[Path]]:
    rng = np.random.default_rng(1)
    key = uuid.uuid4().hex
    schema = pairs_schema(d_prime, "float32", {})
    saved, files = [], []
    with store.writer(PAIRS_STAGE, key, config={}, code_version="0") as w:
        for i in range(SHARDS):
            lengths = rng.integers(pre_len // 2, pre_len * 3 // 2 + 1, PAIRS_PER_FILE)
            pairs = [
                PairStates(
                    f"p{i}-{j}",
                    "train",
                    torch.from_numpy(rng.standard_normal((int(n), d_prime), dtype=np.float32)),
                    torch.from_numpy(rng.standard_normal(d_prime, dtype=np.float32)),
                )
                for j, n in enumerate(lengths)
            ]
            name = f"shards/train/part-{i:05d}.parquet"
            with w.open(name) as f:
                pq.write_table(pairs_to_table(pairs, d_prime, "float32", schema=schema), f, **STATE_WRITE_OPTIONS)
            files.append(name)
            path = tmp / f"pairs-{i}.pt"
            flat = torch.cat([p.pre for p in pairs])
            torch.save(
                {"pre": flat, "lengths": torch.from_numpy(lengths), "post": torch.stack([p.post for p in pairs])}, path
            )
            saved.append(path)
        meta = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "d_prime": d_prime, "dtype": "float32",
                "files": {"train": files}, "pairs": {"train": SHARDS * PAIRS_PER_FILE}}  # fmt: skip
        w.write_json(PAIRS_META, meta)
        manifest = w.commit()
    return PairsReader(store, manifest), saved


def float_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(args: argparse.Namespace, tmp: Path) -> None:
    store = ArtifactStore(f"file://{tmp / 'store'}")
    hidden_art, hidden_pt = write_hidden(store, args.hidden_size, args.rows_per_shard, tmp)
    hidden = HiddenStates.open(hidden_art)
    pairs, pairs_pt = write_pairs(store, args.d_prime, args.pre_len, tmp)
    config = {"shards": SHARDS, "hidden_size": args.hidden_size, "rows_per_shard": args.rows_per_shard,
              "d_prime": args.d_prime, "pre_len": args.pre_len, "pairs_per_file": PAIRS_PER_FILE,
              "loadavg": Path("/proc/loadavg").read_text().split()[:3]}  # fmt: skip

    def hidden_unverified() -> list[torch.Tensor]:
        out = []
        for name in hidden.shards("train"):
            with store.fs.open(hidden_art.path(name), "rb") as f:
                out.append(states_from_table(pq.read_table(f, columns=["state"]), args.hidden_size))
        return out

    def pairs_unverified() -> list[PairStates]:
        out: list[PairStates] = []
        for name in pairs.meta["files"]["train"]:
            with store.fs.open(pairs.artifact.path(name), "rb") as f:
                out.extend(table_to_pairs(pq.read_table(f)))
        return out

    def sha_all(art: Artifact) -> None:
        for name in art.files():
            if name.endswith(".parquet"):
                with store.fs.open(art.path(name), "rb") as f:
                    hashlib.sha256(f.read()).digest()

    hidden_mb = float_bytes([hidden.read_shard(n) for n in hidden.shards("train")]) / 1e6
    pair_list = list(pairs.iter_pairs("train"))
    pairs_mb = float_bytes([p.pre for p in pair_list] + [p.post for p in pair_list]) / 1e6
    file_mb = {
        "hidden": sum(hidden_art.manifest.files[n].size for n in hidden.shards("train")) / 1e6,
        "pairs": sum(pairs.artifact.manifest.files[n].size for n in pairs.meta["files"]["train"]) / 1e6,
    }
    r = args.repeats
    figures = {
        ("torch_load", "hidden", "-"): (hidden_mb, best_of(r, lambda: [torch.load(p) for p in hidden_pt])),
        ("torch_load", "pairs", "-"): (pairs_mb, best_of(r, lambda: [torch.load(p) for p in pairs_pt])),
        ("hidden_read", "hidden", "sha256+page_crc"): (
            hidden_mb,
            best_of(r, lambda: [hidden.read_shard(n) for n in hidden.shards("train")]),
        ),
        ("hidden_read", "hidden", "none"): (hidden_mb, best_of(r, hidden_unverified)),
        ("pair_read", "pairs", "sha256+page_crc"): (pairs_mb, best_of(r, lambda: list(pairs.iter_pairs("train")))),
        ("pair_read", "pairs", "none"): (pairs_mb, best_of(r, pairs_unverified)),
        ("sha256_only", "hidden", "-"): (file_mb["hidden"], best_of(r, lambda: sha_all(hidden_art))),
        ("sha256_only", "pairs", "-"): (file_mb["pairs"], best_of(r, lambda: sha_all(pairs.artifact))),
    }
    for (name, data, verify), (mb, seconds) in figures.items():
        emit(name, mb / seconds, "MB/s", data=data, verify=verify, mb=round(mb, 1), **config)
    for kind in ("hidden", "pairs"):
        peaks = {}
        for n in (1, SHARDS):
            art = hidden_art if kind == "hidden" else pairs.artifact
            child = subprocess.run(
                [sys.executable, "-m", "bench.shard_io", "--child", kind, str(n), store.root, art.stage, art.key],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peaks[n] = json.loads(child.stdout.strip().splitlines()[-1])
        for n, peak in peaks.items():
            growth = round(peak["peak_mib"] - peak["baseline_mib"], 1)
            emit("stream_peak_rss", peak["peak_mib"], "MiB", data=kind, streamed_shards=n,
                 baseline_mib=peak["baseline_mib"], growth_mib=growth, **config)  # fmt: skip


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process; unlike ru_maxrss, VmHWM starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, n: int, root: str, stage: str, key: str) -> None:
    """Stream the first n shards through the training readers; print {baseline_mib, peak_mib}."""
    store = ArtifactStore(root)
    art = store.open(stage, key)
    if kind == "hidden":
        meta = art.read_json(HIDDEN_META)
        meta["shards"]["train"] = meta["shards"]["train"][:n]
        states = HiddenStates(art, meta)
        baseline = status_mib("VmRSS")
        for batch in states.iter_batches("train", 1024, seed=0):
            batch.sum()
    else:
        reader = PairsReader(store, art.manifest)
        reader.meta["files"]["train"] = reader.meta["files"]["train"][:n]
        data = PairData(reader)
        baseline = status_mib("VmRSS")
        for pair_batch in data.iter_batches("train", 8, seed=0):
            pair_batch.pre.sum()
    peak = status_mib("VmHWM")
    print(json.dumps({"baseline_mib": round(baseline, 1), "peak_mib": round(peak, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden-size", type=int, default=576, help="D (SmolLM2-135M: 576)")
    parser.add_argument("--rows-per-shard", type=int, default=8192)
    parser.add_argument("--d-prime", type=int, default=64, help="D' (the local preset: 64)")
    parser.add_argument("--pre-len", type=int, default=80, help="mean pre length of the pairs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=5, metavar=("KIND", "N", "ROOT", "STAGE", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, root, stage, key = args.child
        child(kind, int(n), root, stage, key)
        return
    with tempfile.TemporaryDirectory(prefix="bench-shard-io-") as tmp:
        log(f"writing {SHARDS} hidden-state shards and {SHARDS} pair files under {tmp}")
        measure(args, Path(tmp))


if __name__ == "__main__":
    main()
