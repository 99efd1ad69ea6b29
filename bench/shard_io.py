"""Shard read throughput beside `torch.load` on the same tensors, peak memory while streaming, and the
decoding speed of the vector layouts the shard format was chosen from.

    ./run python -m bench.shard_io [--hidden-size 576] [--rows-per-shard 8192] [--d-prime 64] [--pre-len 80]
                                   [--pairs-per-file 256]

Two artifacts are written into a temporary file:// store with the project's own writers, in the
project's format (llm_trm_core.arrow: vectors as uncompressed fixed_size_binary, sequences as binary,
page checksums): a hidden-states artifact (`ShardedStatesWriter`, 8 shards of --rows-per-shard rows of
D = --hidden-size float32) and a pairs artifact (8 files of 256 pairs, pre of --pre-len positions and post,
D' = --d-prime; 256 pairs per file unless --pairs-per-file says otherwise: the pairs stage's
`pairs.rows_per_shard` default). The same tensors are also `torch.save`d, one file per shard (hidden states: one
(rows, D) tensor; pairs: the flat pre tensor, its lengths and the post tensor), so `torch.load` reads
exactly the bytes of float data that our readers return.

Figures (MB/s of float32 tensor bytes returned, 1 MB = 1e6 bytes, fastest of --repeats passes, files in
the page cache; the passes of the compared readers are interleaved, so a busy machine slows them alike),
each in two regimes: `keep` holds every file's tensors until the pass ends; `stream` drops each file's
before the next is read, as the training readers do (memory reuse differs, and so do the figures):
- torch_load: `torch.load` of every shard file; torch_load_checked: the same after an xxh3-128 digest of
  the file's bytes, which is the check our readers make (`torch.load` alone checks nothing);
- hidden_read: `HiddenStates.iter_rows` over every shard (what compressor training reads), verified (the
  whole file against the manifest's xxh3-128 digest, then parsed; the next shard is read and verified on a
  helper thread while the caller works on the current one), and unverified (each file mapped and decoded
  the same way, one by one, without the digest: what the check costs); hidden_read_one_by_one:
  `HiddenStates.read_shard` of each shard in turn, verified, nothing read ahead;
- pair_read: `PairData.iter_columns` over every file, what TRM training consumes (flat pre rows, their
  start offsets, post vectors and ids), verified and read ahead, and unverified likewise;
  pair_read_one_by_one: `PairData.file_columns` of each file in turn; pair_objects: the verified read cut
  into one PairStates per pair (`PairData.iter_pairs`, what the baselines consume);
- sha256_only / xxh3_only: each digest alone over the same files, to show what verification costs;
- layout_decode: `pyarrow.parquet.read_table` of one hidden-state shard (and one pairs file) held in
  memory, in each candidate layout: list<float> (the former format) and fixed_size_binary, with zstd or
  none, with and without page-checksum verification; and the file size of each.
Peak RSS: a fresh process streams 1 and then 8 shards through `HiddenStates.iter_batches` and
`PairData.iter_batches`; flat memory means the 8-shard peak is close to the 1-shard peak.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import mmap
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash

from bench.common import emit, log
from llm_trm_core.arrow import STATE_WRITE_OPTIONS
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import PairColumns, pairs_to_table, table_to_columns
from llm_trm_core.hidden_states import META_FILE as HIDDEN_META
from llm_trm_core.hidden_states import HiddenStates, ShardedStatesWriter, states_from_table
from llm_trm_core.store import Artifact, ArtifactStore
from llm_trm_core.trm.data import PairData
from llm_trm_core.trm.pairs import META_FILE as PAIRS_META
from llm_trm_core.trm.pairs import PAIRS_STAGE, SCHEMA_NAME, SCHEMA_VERSION, PairsReader, pairs_schema

SHARDS = 8


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    return interleaved(repeats, {"": fn})[""]


def interleaved(repeats: int, fns: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """Fastest of `repeats` passes of each function, passes taken in turn (noise hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def layout_figures(args: argparse.Namespace, config: dict[str, object]) -> None:
    """Decoding speed and file size of each candidate vector layout (one shard held in memory)."""
    rng = np.random.default_rng(2)
    rows, dim = args.rows_per_shard, args.hidden_size
    states = rng.standard_normal((rows, dim), dtype=np.float32)
    flat = pa.array(states.reshape(-1))
    vectors = {
        "list<float>": pa.FixedSizeListArray.from_arrays(flat, dim),
        "fixed_size_binary": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(dim * 4), rows, [None, pa.py_buffer(states)]
        ),
    }
    lengths = rng.integers(args.pre_len // 2, args.pre_len * 3 // 2 + 1, args.pairs_per_file)
    pre = rng.standard_normal((int(lengths.sum()), args.d_prime), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    sequences = {
        "list<list<float>>": pa.ListArray.from_arrays(
            pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(pre.reshape(-1)), args.d_prime)
        ),
        "binary": pa.BinaryArray.from_buffers(
            pa.binary(), args.pairs_per_file, [None, pa.py_buffer(offsets * args.d_prime * 4), pa.py_buffer(pre)]
        ),
    }
    cases = [("hidden", name, array, states.nbytes) for name, array in vectors.items()]
    cases += [("pairs_pre", name, array, pre.nbytes) for name, array in sequences.items()]
    for data, layout, array, nbytes in cases:
        for compression in ("zstd", "none"):
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table({"v": array}), sink, compression=compression, use_dictionary=False,
                           write_statistics=False, write_page_checksum=True)  # fmt: skip
            buffer = sink.getvalue()
            fns = {
                str(crc): lambda crc=crc, b=buffer: pq.read_table(pa.BufferReader(b), page_checksum_verification=crc)
                for crc in (False, True)
            }
            for crc, seconds in interleaved(args.repeats, fns).items():
                emit("layout_decode", nbytes / 1e6 / seconds, "MB/s", data=data, layout=layout,
                     compression=compression, page_checksums=crc == "True", file_mb=round(buffer.size / 1e6, 2),
                     float_mb=round(nbytes / 1e6, 2), **config)  # fmt: skip


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


def write_pairs(
    store: ArtifactStore, d_prime: int, pre_len: int, pairs_per_file: int, tmp: Path
) -> tuple[PairsReader, list[Path]]:
    rng = np.random.default_rng(1)
    key = uuid.uuid4().hex
    schema = pairs_schema(d_prime, "float32", {})
    saved, files = [], []
    with store.writer(PAIRS_STAGE, key, config={}, code_version="0") as w:
        for i in range(SHARDS):
            lengths = rng.integers(pre_len // 2, pre_len * 3 // 2 + 1, pairs_per_file)
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
                "files": {"train": files}, "pairs": {"train": SHARDS * pairs_per_file}}  # fmt: skip
        w.write_json(PAIRS_META, meta)
        manifest = w.commit()
    return PairsReader(store, manifest), saved


def float_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(args: argparse.Namespace, tmp: Path) -> None:
    store = ArtifactStore(f"file://{tmp / 'store'}")
    hidden_art, hidden_pt = write_hidden(store, args.hidden_size, args.rows_per_shard, tmp)
    hidden = HiddenStates.open(hidden_art)
    pairs, pairs_pt = write_pairs(store, args.d_prime, args.pre_len, args.pairs_per_file, tmp)
    pair_data = PairData(pairs)
    config = {"shards": SHARDS, "hidden_size": args.hidden_size, "rows_per_shard": args.rows_per_shard,
              "d_prime": args.d_prime, "pre_len": args.pre_len, "pairs_per_file": args.pairs_per_file,
              "loadavg": Path("/proc/loadavg").read_text().split()[:3]}  # fmt: skip

    def unverified(art: Artifact, name: str, columns: list[str] | None = None) -> pa.Table:
        """The file mapped and decoded as `read_parquet` does (llm_trm_core.arrow), without the digest."""
        with open(art.path(name), "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        parquet = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)), page_checksum_verification=False)
        return parquet.read(columns=columns, use_threads=False)

    def hidden_unverified(name: str) -> torch.Tensor:
        return states_from_table(unverified(hidden_art, name, ["state"]), args.hidden_size)

    def pairs_unverified(name: str) -> PairColumns:
        return table_to_columns(unverified(pairs.artifact, name))

    def torch_load_checked(path: Path) -> object:
        with open(path, "rb") as f:
            xxhash.xxh3_128_digest(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return torch.load(path)

    def digest_all(art: Artifact, digest: Callable[[bytes], object]) -> None:
        for name in art.files():
            if name.endswith(".parquet"):
                with store.fs.open(art.path(name), "rb") as f:
                    digest(f.read())

    hidden_names, pair_names = hidden.shards("train"), pairs.meta["files"]["train"]
    hidden_mb = float_bytes([hidden.read_shard(n) for n in hidden_names]) / 1e6
    pair_list = list(pair_data.iter_pairs("train"))
    pairs_mb = float_bytes([p.pre for p in pair_list] + [p.post for p in pair_list]) / 1e6
    file_mb = {
        "hidden": sum(hidden_art.manifest.files[n].size for n in hidden_names) / 1e6,
        "pairs": sum(pairs.artifact.manifest.files[n].size for n in pair_names) / 1e6,
    }
    # Each reader: every file of the set, in order, as an iterator (what a pass consumes).
    readers: dict[tuple[str, str, str], tuple[float, Callable[[], Iterator[object]]]] = {
        ("torch_load", "hidden", "-"): (hidden_mb, lambda: map(torch.load, hidden_pt)),
        ("torch_load_checked", "hidden", "xxh3"): (hidden_mb, lambda: map(torch_load_checked, hidden_pt)),
        ("hidden_read", "hidden", "xxh3"): (hidden_mb, lambda: hidden.iter_rows("train")),
        ("hidden_read_one_by_one", "hidden", "xxh3"): (hidden_mb, lambda: map(hidden.read_shard, hidden_names)),
        ("hidden_read", "hidden", "none"): (hidden_mb, lambda: map(hidden_unverified, hidden_names)),
        ("torch_load", "pairs", "-"): (pairs_mb, lambda: map(torch.load, pairs_pt)),
        ("torch_load_checked", "pairs", "xxh3"): (pairs_mb, lambda: map(torch_load_checked, pairs_pt)),
        ("pair_read", "pairs", "xxh3"): (pairs_mb, lambda: pair_data.iter_columns("train")),
        ("pair_read_one_by_one", "pairs", "xxh3"): (pairs_mb, lambda: map(pair_data.file_columns, pair_names)),
        ("pair_read", "pairs", "none"): (pairs_mb, lambda: map(pairs_unverified, pair_names)),
        ("pair_objects", "pairs", "xxh3"): (pairs_mb, lambda: pair_data.iter_pairs("train")),
    }  # fmt: skip

    def keep(files: Callable[[], Iterator[object]]) -> list[object]:
        return list(files())  # every file's tensors alive until the pass ends

    def stream(files: Callable[[], Iterator[object]]) -> None:
        for _ in files():
            pass  # each file dropped before the next is parsed, as the training readers do

    figures: dict[tuple[str, str, str, str], tuple[float, float]] = {}
    for regime, run in (("keep", keep), ("stream", stream)):
        for data in ("hidden", "pairs"):
            chosen = {key: value for key, value in readers.items() if key[1] == data}
            passes = {"/".join(key): functools.partial(run, files) for key, (_, files) in chosen.items()}
            times = interleaved(args.repeats, passes)
            for key, (mb, _) in chosen.items():
                figures[(*key, regime)] = (mb, times["/".join(key)])
    for kind, art in (("hidden", hidden_art), ("pairs", pairs.artifact)):
        for name, digest in (("sha256_only", lambda b: hashlib.sha256(b).digest()),
                             ("xxh3_only", xxhash.xxh3_128_digest)):  # fmt: skip
            seconds = best_of(args.repeats, functools.partial(digest_all, art, digest))
            figures[(name, kind, "-", "-")] = (file_mb[kind], seconds)
    for (name, data, verify, regime), (mb, seconds) in figures.items():
        emit(name, mb / seconds, "MB/s", data=data, verify=verify, regime=regime, mb=round(mb, 1),
             file_mb=round(file_mb[data], 1), **config)  # fmt: skip
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
    parser.add_argument("--pairs-per-file", type=int, default=256, help="pairs per file (pairs.rows_per_shard)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-layouts", action="store_true", help="only the project's format, not the alternatives")
    parser.add_argument("--child", nargs=5, metavar=("KIND", "N", "ROOT", "STAGE", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, root, stage, key = args.child
        child(kind, int(n), root, stage, key)
        return
    with tempfile.TemporaryDirectory(prefix="bench-shard-io-") as tmp:
        log(f"writing {SHARDS} hidden-state shards and {SHARDS} pair files under {tmp}")
        measure(args, Path(tmp))
    if not args.skip_layouts:
        layout_figures(args, {"rows_per_shard": args.rows_per_shard, "hidden_size": args.hidden_size,
                              "d_prime": args.d_prime, "pre_len": args.pre_len})  # fmt: skip


if __name__ == "__main__":
    main()
