"""Artifact-store write and read throughput on file://, memory:// and gs:// (local GCS emulator).

    ./run python -m bench.store_throughput [--mib 64] [--files 8]

Write = atomic per-file writes (temporary name, then move / copy+delete) with sha256, plus the manifest.
Read = open with verification (sizes + small-file sha256), then read every file.
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

from bench.common import emit, log, timer
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


def measure(root: str, total_mib: int, n_files: int) -> None:
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
    with timer() as t:
        art = store.open("bench", key)
        for name in art.files():
            art.read_bytes(name)
    emit("store_read_throughput", mib / t[0], "MiB/s", backend=backend, mib=mib, files=n_files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        measure(f"file://{tmp}", args.mib, args.files)
    measure(f"memory://bench-{uuid.uuid4().hex[:6]}", args.mib, args.files)
    proc, endpoint = _start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    log(f"GCS emulator at {endpoint}")
    try:
        measure("gs://bench/store", args.mib, args.files)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
