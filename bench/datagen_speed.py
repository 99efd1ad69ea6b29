"""Datagen figures: generation speed with and without hidden-state extraction; pair-shard IO vs torch.save;
peak memory of streaming one shard vs all shards.

    ./run python -m bench.datagen_speed [--preset local] [--problems 8] [--new-tokens 64]

1. tokens/s of plain batched `generate` on think-mode prompts (the local preset's budgets), and the cost
   of the extraction we add (a hook on one layer during the answer prefill), at the same batch size;
2. write / read MB/s of the (pre, post) Parquet format vs `torch.save` / `torch.load(weights_only=True)`
   of the same tensors;
3. peak RSS of a process that streams 1 shard vs one that streams all shards (target: flat).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.common import emit, log, timer
from llm_trm_core.config import load_config
from llm_trm_core.data.problems import load_problems
from llm_trm_core.datagen.generate import PairStates, ThinkingGenerator
from llm_trm_core.datagen.records import pairs_to_table, table_to_pairs
from llm_trm_core.hidden_states import TextChunk, extract_states, resolve_layer
from llm_trm_core.lm import load_language_model


def generation(preset: str, n: int, new_tokens: int, answer_tokens: int) -> None:
    cfg = load_config(preset, [f"datagen.max_new_tokens={new_tokens}", f"datagen.batch_size={n}"])
    lm = load_language_model(cfg.model, cfg.runtime)
    problems = load_problems(cfg.problems).problems[:n]
    generator = ThinkingGenerator(lm, cfg.datagen, resolve_layer(cfg.compressor.layer, lm.info.num_layers))
    prompts = [list(lm.tokenizer(lm.chat.prompt(p.question), add_special_tokens=False).input_ids) for p in problems]
    generator._generate(prompts[:2], 4, [])  # warm-up

    def best_of(repeats: int, fn):
        times, result = [], None
        for _ in range(repeats):
            torch.manual_seed(0)
            with timer() as t:
                result = fn()
            times.append(t[0])
        return min(times), result

    think_s, (new, _) = best_of(1, lambda: generator._generate(prompts, new_tokens, []))
    tokens = sum(len(generator._cut_at_eos(ids)[0]) for ids in new)
    emit("generate_tokens_per_s", tokens / think_s, "tok/s", batch=n, new_tokens=new_tokens, tokens=tokens)
    sequences = [p + generator._cut_at_eos(ids)[0] for p, ids in zip(prompts, new, strict=True)]
    plain_s, _ = best_of(2, lambda: generator._generate(sequences, answer_tokens, []))
    captured_s, _ = best_of(2, lambda: generator._generate(sequences, answer_tokens, [], capture=True))
    emit("answer_generate_seconds", plain_s, "s", batch=n, answer_tokens=answer_tokens, capture=False)
    emit("answer_generate_seconds", captured_s, "s", batch=n, answer_tokens=answer_tokens, capture=True)
    overhead = max(captured_s - plain_s, 0.0) / (think_s + plain_s)
    emit("extraction_overhead", overhead, "fraction of generation time", target="<= 0.20",
         note="states captured by a hook in the answer prefill; no extra forward")  # fmt: skip
    layer = resolve_layer(cfg.compressor.layer, lm.info.num_layers)
    with timer() as f, torch.no_grad():  # what a separate teacher-forced pass would cost instead
        for chunk in range(0, len(sequences), n):
            list(
                extract_states(
                    lm.model,
                    [TextChunk("x", "train", s) for s in sequences[chunk : chunk + n]],
                    layer,
                    n,
                    generator.pad_id,
                )
            )
    emit("separate_forward_would_cost", f[0] / (think_s + plain_s), "fraction of generation time")


def synthetic_pairs(n: int, length: int, dim: int) -> list[PairStates]:
    g = torch.Generator().manual_seed(0)
    return [
        PairStates(f"p{i}", "train", torch.randn(length, dim, generator=g), torch.randn(dim, generator=g))
        for i in range(n)
    ]


def io_speed(n: int, length: int, dim: int) -> None:
    pairs = synthetic_pairs(n, length, dim)
    mb = sum(p.pre.numel() + p.post.numel() for p in pairs) * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        with timer() as t:
            pq.write_table(pairs_to_table(pairs, dim, "float32"), path)
        emit("pairs_parquet_write", mb / t[0], "MB/s", pairs=n, pre_len=length, dim=dim, mb=round(mb, 1))
        with timer() as t:
            back = list(table_to_pairs(pq.read_table(path)))
        assert torch.equal(back[-1].pre, pairs[-1].pre)
        emit("pairs_parquet_read", mb / t[0], "MB/s", pairs=n)
        blob = [{"id": p.id, "pre": p.pre, "post": p.post} for p in pairs]
        target = Path(tmp) / "pairs.pt"
        with timer() as t:
            torch.save(blob, target)
        emit("pairs_torch_save", mb / t[0], "MB/s", pairs=n)
        with timer() as t:
            torch.load(target, weights_only=True)
        emit("pairs_torch_load", mb / t[0], "MB/s", pairs=n)


def stream_child(folder: str, count: int) -> None:
    """Read `count` shard files one by one, keeping nothing; print peak RSS in MiB."""
    files = sorted(Path(folder).glob("*.parquet"))[:count]
    seen = 0
    for path in files:
        for pair in table_to_pairs(pq.read_table(path)):
            seen += pair.pre.shape[0]
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seen)


def memory(shards: int, per_shard: int, length: int, dim: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(shards):
            pq.write_table(
                pairs_to_table(synthetic_pairs(per_shard, length, dim), dim, "float32"), f"{tmp}/part-{i:05d}.parquet"
            )
        shard_mb = Path(f"{tmp}/part-00000.parquet").stat().st_size / 2**20
        for count in (1, shards):
            out = subprocess.run(
                [sys.executable, "-m", "bench.datagen_speed", "--stream-child", tmp, str(count)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peak = float(out.stdout.split()[0])
            emit(
                "stream_peak_rss",
                peak,
                "MiB",
                shards_read=count,
                shard_mb=round(shard_mb, 1),
                total_mb=round(shard_mb * count, 1),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--stream-child", nargs=2, metavar=("FOLDER", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        stream_child(args.stream_child[0], int(args.stream_child[1]))
        return
    start = time.perf_counter()
    log("generation ...")
    generation(args.preset, args.problems, args.new_tokens, args.answer_tokens)
    log("shard IO ...")
    io_speed(200, 150, 576)
    log("streaming memory ...")
    memory(shards=20, per_shard=64, length=150, dim=576)
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
