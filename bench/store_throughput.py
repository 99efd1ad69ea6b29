"""Artifact-store write and read throughput on file://, memory:// and gs:// (local GCS emulator).

    ./run python -m bench.store_throughput [--mib 64] [--files 8] [--shard-mib 4]

Write = atomic per-file writes (temporary name, then move / copy+delete) with sha256, plus the manifest.
Read = open (sizes), then read every file, verified (`read_bytes`: the whole file, sha256 against the
manifest) and unverified (the same bytes straight from the filesystem): the difference is what
verification costs. Parquet = hidden-state shards (float32 vectors, zstd, page checksums, about
--shard-mib each) read into Arrow tables, verified (`read_parquet`: sha256 of the whole file, then page
checksums while decoding) and unverified (`pq.read_table` on the open file, no checksums); MiB/s of file
bytes. Each read figure is the fastest of 3 passes (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import emit, log, timer
from llm_trm_core.arrow import STATE_WRITE_OPTIONS, read_parquet
from llm_trm_core.store import ArtifactStore


def _start_emulator() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    proc = subprocess.Popen(
        [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def measure(root: str, total_mib: int, n_files: int, shard_mib: int) -> None:
    store = ArtifactStore(root)
    chunk = os.urandom(1 << 20)
    per_file = max(1, total_mib // n_files)
    key = uuid.uuid4().hex
    with timer() as t, store.writer("bench", key, config={}, code_version="0") as w:
        for i in range(n_files):
            with w.open(f"part-{i:03d}.bin") as f:
                for _ in range(per_file):
                    f.write(chunk)
        w.commit()
    mib = per_file * n_files
    backend = root.split("://")[0]
    emit("store_write_throughput", mib / t[0], "MiB/s", backend=backend, mib=mib, files=n_files)

    def read_all(verify: str) -> float:
        with timer() as t:
            art = store.open("bench", key)
            for name in art.files():
                if verify == "none":
                    with store.fs.open(art.path(name), "rb") as f:
                        f.read()
                else:
                    art.read_bytes(name)
        return t[0]

    best = {mode: min(read_all(mode) for _ in range(3)) for mode in ("sha256", "none")}
    for mode, seconds in best.items():
        emit("store_read_throughput", mib / seconds, "MiB/s", backend=backend, mib=mib, files=n_files, verify=mode)
    _measure_parquet(store, backend, total_mib, shard_mib)


def _measure_parquet(store: ArtifactStore, backend: str, total_mib: int, shard_mib: int) -> None:
    dim = 1024
    rows = max(1, shard_mib * (1 << 20) // (4 * dim))
    n_shards = max(1, total_mib // shard_mib)
    rng = np.random.default_rng(0)
    key = uuid.uuid4().hex
    with store.writer("bench-parquet", key, config={}, code_version="0") as w:
        for i in range(n_shards):
            states = rng.standard_normal(rows * dim, dtype=np.float32)
            table = pa.table(
                {
                    "doc_id": pa.array([f"doc{r // 64}" for r in range(rows)]),
                    "position": pa.array(np.arange(rows, dtype=np.int32)),
                    "state": pa.FixedSizeListArray.from_arrays(pa.array(states), dim),
                }
            )
            with w.open(f"states/part-{i:05d}.parquet") as f:
                pq.write_table(table, f, **STATE_WRITE_OPTIONS)
        manifest = w.commit()
    art = store.open("bench-parquet", key)
    mib = sum(e.size for e in manifest.files.values()) / (1 << 20)
    config = {"backend": backend, "mib": round(mib, 1), "files": n_shards, "rows_per_file": rows, "dim": dim}

    def read_all(verify: str) -> float:
        with timer() as t:
            for name in art.files():
                if verify == "none":
                    with store.fs.open(art.path(name), "rb") as f:
                        pq.read_table(f)
                else:
                    read_parquet(art, name)
        return t[0]

    modes = ("sha256+page_crc", "none")
    best = {mode: min(read_all(mode) for _ in range(3)) for mode in modes}
    for mode in modes:
        emit("parquet_read_throughput", mib / best[mode], "MiB/s", **config, verify=mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--shard-mib", type=int, default=4, help="size of each Parquet shard (MiB of float32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        measure(f"file://{tmp}", args.mib, args.files, args.shard_mib)
    measure(f"memory://bench-{uuid.uuid4().hex[:6]}", args.mib, args.files, args.shard_mib)
    proc, endpoint = _start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    log(f"GCS emulator at {endpoint}")
    try:
        measure("gs://bench/store", args.mib, args.files, args.shard_mib)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
