"""Stage 2 data on the tiny preset: rows, consistent pairs, failures, resume after SIGKILL, pair shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from llm_trm_core.config import load_config
from llm_trm_core.data.problems import Problem
from llm_trm_core.datagen.artifacts import SHARD_STAGE, iter_pair_states, iter_rows
from llm_trm_core.datagen.generate import ThinkingGenerator
from llm_trm_core.errors import UserError
from llm_trm_core.faults import FAULT_ENV
from llm_trm_core.lm import load_language_model
from llm_trm_core.stages.compressor import load_compressor, run_basis, run_compressor, run_corpus_hiddens
from llm_trm_core.stages.datagen import datagen_problems, plan_shards, run_datagen_report, run_datagen_shard, shard_key
from llm_trm_core.stages.pairs import run_pairs, run_trace_hiddens
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.store import ArtifactStore
from llm_trm_core.trm.data import PairData
from llm_trm_core.trm.pairs import PairsReader

REPO = Path(__file__).resolve().parent.parent
SAMPLED = ["datagen.temperature=0.9", "datagen.num_problems=10", "datagen.shard_size=6", "datagen.batch_size=2"]


def _cfg(*overrides: str, root: str | None = None):
    return load_config("tiny", [f"store.root={root or f'memory://dg-{uuid.uuid4().hex[:8]}'}", *overrides])


def _datagen(cfg):
    store = ArtifactStore(cfg.store.root)
    problems = run_problems(cfg, store)
    specs = plan_shards(cfg, len(datagen_problems(store, problems, cfg)))
    shards = [run_datagen_shard(cfg, store, problems, spec) for spec in specs]
    return store, problems, run_datagen_report(cfg, store, problems, shards)


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = load_config("tiny")
    return load_language_model(cfg.model, cfg.runtime)


def test_one_row_per_problem_and_post_is_the_end_of_thinking_state_for_every_sample(tiny_lm) -> None:
    cfg = _cfg(*SAMPLED)
    store, problems, report = _datagen(cfg)
    rows = list(iter_rows(store, report))
    expected = datagen_problems(store, problems, cfg)
    assert [r["problem_index"] for r in rows] == list(range(len(expected)))
    assert [r["id"] for r in rows] == [p.id for p in expected]
    pairs = {p.id: p for p in iter_pair_states(store, report)}
    end_id = tiny_lm.chat.delimiters.end_ids[0]
    start_id = tiny_lm.chat.delimiters.start_ids[0]
    prefix = {len(r["prompt_ids"][: r["system_prefix_len"]]) for r in rows}
    assert len(prefix) == 1 and prefix.pop() > 50  # the shared system-prompt prefix, the same in every row
    ok = [r for r in rows if r["failure"] is None]
    assert ok and len(pairs) == len(ok)
    for row in ok:
        full = list(row["prompt_ids"]) + list(row["trace_ids"])
        assert full[row["think_end"]] == end_id == full[-1]  # post position = the </think> token, always
        assert full[row["think_start"]] == start_id
        # one teacher-forced forward of this sample alone gives exactly the stored pre and post
        out = tiny_lm.model(input_ids=torch.tensor([full]), output_hidden_states=True)
        states = out.hidden_states[-1][0]
        torch.testing.assert_close(pairs[row["id"]].post, states[row["think_end"]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pairs[row["id"]].pre, states[: row["think_start"]], atol=1e-5, rtol=1e-4)
        assert row["think_tokens"] == row["think_end"] - row["think_start"] + 1
        assert row["end_source"] in ("delimiter", "answer_marker", "eos", "budget")
    summary = report.metrics
    assert summary["problems"] == len(rows) == summary["succeeded"] + sum(summary["failures"].values())
    assert store.open("datagen", report.key).read_bytes("think_length.png")[:4] == b"\x89PNG"
    # the token after the span, read from the traces and named by the tokenizer
    following = summary["token_after_span"]
    first = Counter(int(r["answer_ids"][0]) if len(r["answer_ids"]) else -1 for r in ok)
    assert following["spans"] == len(ok) and sum(first.values()) == len(ok)
    top = following["top"][0]
    assert top["share"] == first.most_common(1)[0][1] / len(ok)
    assert top["text"] == (repr(tiny_lm.tokenizer.decode([top["id"]])) if top["id"] >= 0 else "(none)")
    assert f"{top['text']} {top['share']:.0%}" in store.open("datagen", report.key).read_bytes("report.md").decode()


def test_seeded_sampling_is_reproducible(tiny_lm) -> None:
    first = [r["trace_ids"] for r in iter_rows(*_datagen(_cfg(*SAMPLED))[::2])]
    second = [r["trace_ids"] for r in iter_rows(*_datagen(_cfg(*SAMPLED))[::2])]
    other = [r["trace_ids"] for r in iter_rows(*_datagen(_cfg(*SAMPLED, "runtime.seed=5"))[::2])]
    assert first == second and first != other


def test_failures_are_recorded_not_dropped() -> None:
    store, _, report = _datagen(_cfg("datagen.close_on_budget=false", "datagen.close_on_eos=false"))
    rows = list(iter_rows(store, report))
    assert len(rows) == report.metrics["problems"] == 24
    assert all(r["failure"] in ("truncated", "no_end") for r in rows if r["failure"])
    assert report.metrics["failures"]["truncated"] + report.metrics["failures"]["no_end"] > 0
    assert len(list(iter_pair_states(store, report))) == report.metrics["succeeded"]

    store, _, report = _datagen(_cfg("model.thinking=native"))  # the random model never opens <think>
    assert report.metrics["failures"]["no_start"] == 24 and report.metrics["succeeded"] == 0
    with pytest.raises(UserError, match="no successful generations"):
        run_trace_hiddens(_cfg("model.thinking=native", root=store.root), store, report)

    store, _, report = _datagen(_cfg("model.tiny.max_position_embeddings=128"))
    rows = list(iter_rows(store, report))
    assert all(r["failure"].startswith("error: prompt of") and "context of 128" in r["failure"] for r in rows)
    assert "exceeds the model's context" in store.open("datagen", report.key).read_bytes("report.md").decode()


def test_empty_question_is_a_recorded_failure(tiny_lm) -> None:
    cfg = load_config("tiny")
    generator = ThinkingGenerator(tiny_lm, cfg.datagen, layer_index=-1)
    good = Problem("p1", "train", "What is 2 + 2?", "#### 4", 4.0)
    empty = Problem("p2", "train", "   ", "#### 1", 1.0)
    rows, pairs = generator.run_batch([(0, good), (1, empty)], seed=0)
    assert rows[1]["failure"] == "error: empty question" and rows[0]["failure"] is None
    assert [p.id for p in pairs] == ["p1"]


def test_committed_shards_are_never_redone(monkeypatch) -> None:
    cfg = _cfg()
    store, problems, _ = _datagen(cfg)
    import llm_trm_core.stages.datagen as module

    monkeypatch.setattr(module, "ThinkingGenerator", None)  # any generation would now fail
    spec = plan_shards(cfg, 24)[1]
    assert run_datagen_shard(cfg, store, problems, spec).key == shard_key(cfg, problems, spec)
    # more problems: the first shards keep their keys, only the new one is generated
    bigger = _cfg("datagen.num_problems=32", root=cfg.store.root)
    assert [shard_key(bigger, problems, s) for s in plan_shards(bigger, 32)[:3]] == [
        shard_key(cfg, problems, s) for s in plan_shards(cfg, 24)
    ]


def _run_datagen(root: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "flows.cli", "stage", "datagen", "--preset", "tiny", "--store", root, *overrides]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_a_shard_killed_mid_way_resumes_without_duplicates_or_gaps(tmp_path: Path) -> None:
    killed, straight = f"file://{tmp_path / 'killed'}", f"file://{tmp_path / 'straight'}"
    proc = _run_datagen(killed, *SAMPLED, env={FAULT_ENV: "datagen-part:2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    store = ArtifactStore(killed)
    assert store.list_keys(SHARD_STAGE) == []
    parts = sorted(p.rsplit("/", 1)[-1] for p in store.fs.glob(f"{store.base}/{SHARD_STAGE}/*/rows/part-*.parquet"))
    assert parts == ["part-000000-000002.parquet", "part-000002-000004.parquet"]  # two batches were published

    resumed = _run_datagen(killed, *SAMPLED)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at problem index 4" in resumed.stderr
    report = store.read_manifest("datagen", json.loads(resumed.stdout.splitlines()[-1])["key"])
    done = _run_datagen(straight, *SAMPLED)
    other = ArtifactStore(straight)
    reference = other.read_manifest("datagen", json.loads(done.stdout.splitlines()[-1])["key"])
    rows, expected = list(iter_rows(store, report)), list(iter_rows(other, reference))
    assert [r["problem_index"] for r in rows] == list(range(10))  # no duplicates, no gaps
    assert rows == expected  # the same samples as an uninterrupted run
    for a, b in zip(iter_pair_states(store, report), iter_pair_states(other, reference), strict=True):
        assert a.id == b.id and torch.equal(a.post, b.post)


def test_pairs_shards_schema_readers_and_values(tmp_path: Path) -> None:
    cfg = _cfg("datagen.num_problems=12", "pairs.rows_per_shard=3", root=f"file://{tmp_path / 'store'}")
    store, _, report = _datagen(cfg)
    hiddens = run_corpus_hiddens(cfg, store)
    compressor = run_compressor(cfg, store, hiddens, run_basis(cfg, store, hiddens))
    manifest = run_pairs(cfg, store, report, compressor)
    reader = PairsReader(store, manifest)
    meta = reader.meta
    assert meta["schema"] == "llm-trm/pairs" and meta["d_prime"] == "16" and meta["compressor_key"] == compressor.key
    files = [f.removeprefix("file://") for split in ("train", "val", "test") for f in reader.files(split)]
    assert len(files) >= 4  # train is split into several files of 3 pairs

    schema = pq.read_schema(files[0])
    assert schema.metadata[b"schema_version"] == b"2" and schema.metadata[b"layer"] == b"-1"
    assert schema.field("post").type == pa.binary(16 * 4) and schema.field("pre").type == pa.binary()
    table = pads.dataset(files, format="parquet").to_table()
    assert table.num_rows == sum(meta["pairs"].values())

    from datasets import load_dataset

    streamed = load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    first = next(iter(streamed))  # vectors are little-endian float32 bytes: one frombuffer away from numbers
    pre, post = np.frombuffer(first["pre"], "<f4").reshape(-1, 16), np.frombuffer(first["post"], "<f4")
    assert post.shape == (16,) and pre.shape == (first["pre_len"], 16)
    by_id = {p.id: p for p in PairData(reader).iter_pairs("train")}
    np.testing.assert_array_equal(post, by_id[first["id"]].post.numpy())
    np.testing.assert_array_equal(pre, by_id[first["id"]].pre.numpy())

    # values: compressed exactly as the compressor does, without the shared system-prompt prefix
    model = load_compressor(store, compressor)
    raw = {p.id: p for p in iter_pair_states(store, report)}
    rows = {r["id"]: r for r in iter_rows(store, report)}
    for pair in PairData(reader).iter_pairs("train"):
        source = raw[pair.id]
        prefix = rows[pair.id]["system_prefix_len"]
        assert pair.pre.shape == (rows[pair.id]["think_start"] - prefix, 16)
        with torch.no_grad():
            torch.testing.assert_close(pair.post, model.compress(source.post), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(pair.pre, model.compress(source.pre[prefix:]), atol=1e-5, rtol=1e-4)

    half = run_pairs(
        _cfg("pairs.dtype=float16", "pairs.pre_positions=all", root=cfg.store.root), store, report, compressor
    )
    first_half = next(PairData(PairsReader(store, half)).iter_pairs("train"))
    assert first_half.pre.shape[0] == rows[first_half.id]["think_start"]
    half_schema = pq.read_schema(PairsReader(store, half).files("train")[0].removeprefix("file://"))
    assert half_schema.metadata[b"dtype"] == b"float16" and half_schema.field("post").type == pa.binary(16 * 2)
    assert first_half.post.dtype == torch.float32 and first_half.post.shape == (16,)


def test_pairs_refuse_a_compressor_of_another_model() -> None:
    cfg = _cfg()
    store, _, report = _datagen(cfg)
    small = _cfg("model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", root=cfg.store.root)
    hiddens = run_corpus_hiddens(small, store)
    foreign = run_compressor(small, store, hiddens, run_basis(small, store, hiddens))
    with pytest.raises(UserError, match="different language models"):
        run_pairs(cfg, store, report, foreign)
