"""Stage 1 end to end on the tiny preset: caching, keys, resume, DDP, 1b, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import llm_trm_core.stages.compressor as stage
import llm_trm_core.stages.publish as publish
from llm_trm_core.config import load_config
from llm_trm_core.errors import UserError
from llm_trm_core.faults import FAULT_ENV
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.stages.compressor import (
    load_compressor,
    run_basis,
    run_compressor,
    run_corpus_hiddens,
    with_compressor,
)
from llm_trm_core.stages.keys import key_for
from llm_trm_core.store import ArtifactStore
from llm_trm_core.training.checkpoints import CheckpointManager

REPO = Path(__file__).resolve().parent.parent
SGD = ["compressor.solver=sgd", "compressor.max_steps=16", "compressor.checkpoint_every=8", "compressor.eval_every=4"]


def _cfg(*overrides: str, root: str | None = None):
    return load_config("tiny", [f"store.root={root or f'memory://c-{uuid.uuid4().hex[:8]}'}", *overrides])


def _stage1(cfg):
    store = ArtifactStore(cfg.store.root)
    hiddens = run_corpus_hiddens(cfg, store)
    return store, hiddens, run_basis(cfg, store, hiddens)


def test_stage1_artifacts_are_cached_and_keys_track_only_what_matters(monkeypatch) -> None:
    cfg = _cfg()
    store, hiddens, basis = _stage1(cfg)
    first = run_compressor(cfg, store, hiddens, basis)
    assert first.metrics["test"]["r2"] > first.metrics["baselines"]["random_init"]["r2"]
    assert first.metrics["test"]["r2"] > first.metrics["baselines"]["mean"]["r2"]
    assert hiddens.metrics["tokens_train"] > hiddens.metrics["tokens_test"] > 0

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(publish, "extract_states", boom)
    monkeypatch.setattr(stage, "train_sgd", boom)
    monkeypatch.setattr(stage, "solve", boom)
    assert run_corpus_hiddens(cfg, store) == hiddens
    assert run_basis(cfg, store, hiddens) == basis
    assert run_compressor(cfg, store, hiddens, basis) == first

    # hidden states do not depend on D' or the solver; a closed-form compressor not on SGD settings or seed
    assert key_for(with_compressor(cfg, d_prime=8, solver="sgd"), "hiddens") == key_for(cfg, "hiddens")
    up = {"hiddens": hiddens.key}
    base = key_for(cfg, "compressor", up)
    assert key_for(with_compressor(cfg, lr=0.5), "compressor", up) == base
    assert key_for(_cfg("runtime.seed=7"), "compressor", up) == base
    assert key_for(with_compressor(cfg, d_prime=8), "compressor", up) != base
    sgd = with_compressor(cfg, solver="sgd")
    assert key_for(with_compressor(sgd, lr=0.5), "compressor", up) != key_for(sgd, "compressor", up)
    assert key_for(_cfg("corpus.max_tokens=32"), "hiddens") != key_for(cfg, "hiddens")


def test_sgd_early_stops_on_the_validation_split_and_keeps_the_best_weights() -> None:
    cfg = _cfg("compressor.solver=sgd", "compressor.lr=3.0", "compressor.eval_every=2", "compressor.patience=2")
    store, hiddens, basis = _stage1(cfg)
    manifest = run_compressor(cfg, store, hiddens, basis)
    sgd = manifest.metrics["sgd"]
    assert sgd["stopped_early"] and sgd["best_step"] < sgd["steps"]
    history = store.open("compressor", manifest.key).read_json("history.json")
    assert min(h["val_mse"] for h in history) == pytest.approx(sgd["best_val_mse"])


def test_diverging_training_is_a_clear_error_and_keeps_committed_artifacts() -> None:
    cfg = _cfg()
    store, hiddens, basis = _stage1(cfg)
    good = run_compressor(cfg, store, hiddens, basis)
    bad = with_compressor(cfg, solver="sgd", lr=1e18, warmup_steps=0)
    with pytest.raises(UserError, match="diverged"):
        run_compressor(bad, store, hiddens, basis)
    assert store.open("compressor", good.key).manifest == good  # untouched
    assert store.list_keys("compressor") == [good.key]


def test_bad_inputs_are_clear_errors(monkeypatch) -> None:
    cfg = _cfg()
    store, hiddens, basis = _stage1(cfg)
    with pytest.raises(UserError, match="hidden size D=64"):
        run_compressor(with_compressor(cfg, d_prime=64), store, hiddens, basis)
    assert store.list_keys("compressor") == []

    with pytest.raises(UserError, match="no .*data among .*raise corpus.num_documents"):
        run_corpus_hiddens(_cfg("corpus.num_documents=2"), store)

    monkeypatch.setattr(stage, "iter_corpus", lambda corpus: iter(()))
    with pytest.raises(UserError, match="produced no text"):
        run_corpus_hiddens(_cfg("corpus.max_tokens=48"), store)
    assert store.list_keys("hiddens") == [hiddens.key]

    with pytest.raises(UserError, match="phase 1b starts from a 1a compressor"):
        run_compressor(cfg, store, hiddens, basis, phase="1b")


def test_phase_1b_starts_from_1a_and_refuses_a_compressor_of_another_model() -> None:
    cfg = _cfg()
    store, hiddens, basis = _stage1(cfg)
    first = run_compressor(cfg, store, hiddens, basis)
    # "thinking traces": another set of hidden states of the same model
    other = _cfg("corpus.num_documents=60", root=cfg.store.root)
    _, hiddens_b, basis_b = _stage1(other)
    tune = with_compressor(other, solver="sgd", lr=1e-9, max_steps=1, warmup_steps=0)
    second = run_compressor(tune, store, hiddens_b, basis_b, phase="1b", init=first)
    assert second.key != first.key and second.upstream["init"] == first.key
    torch.testing.assert_close(load_compressor(store, second).weight, load_compressor(store, first).weight)

    small = _cfg("model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "compressor.d_prime=16")
    small_store, small_h, small_b = _stage1(small)
    foreign = run_compressor(small, small_store, small_h, small_b)
    small_store.fs.cp(
        small_store.path("compressor", foreign.key), store.path("compressor", foreign.key), recursive=True
    )
    with pytest.raises(UserError, match="another language model"):
        run_compressor(tune, store, hiddens_b, basis_b, phase="1b", init=foreign)


def _run_stage(root: str, *overrides: str, env: dict[str, str] | None = None, torchrun: bool = False):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    )
    cmd = [*launcher, "-m", "flows.cli", "stage", "compressor", "--preset", "tiny", "--store", root, *overrides]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1])


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    killed, straight = f"file://{tmp_path / 'killed'}", f"file://{tmp_path / 'straight'}"
    proc = _run_stage(killed, *SGD, env={FAULT_ENV: "checkpoint:8"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    store = ArtifactStore(killed)
    assert store.list_keys("compressor") == []  # nothing committed
    (key,) = [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path("compressor", "")[:-1], detail=False)]
    assert CheckpointManager(store, "compressor", key).complete_steps() == [8]

    resumed = _result(_run_stage(killed, *SGD))
    assert resumed["key"] == key
    manifest = store.read_manifest("compressor", key)
    assert manifest is not None and manifest.metrics["sgd"]["resumed_from"] == 8
    assert manifest.metrics["sgd"]["steps"] == 16
    assert CheckpointManager(store, "compressor", key).complete_steps() == []  # cleaned after commit

    uninterrupted = _result(_run_stage(straight, *SGD))
    other = ArtifactStore(straight)
    a, b = load_compressor(store, manifest), load_compressor(other, other.read_manifest("compressor", key))
    assert torch.equal(a.weight, b.weight)
    assert store.open("compressor", key).read_json("history.json") == other.open("compressor", key).read_json(
        "history.json"
    )
    assert uninterrupted["key"] == key


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    overrides = ["compressor.solver=sgd", "compressor.max_steps=12", "compressor.eval_every=6"]
    single = _result(_run_stage(f"file://{tmp_path / 'one'}", *overrides))
    double = _result(_run_stage(f"file://{tmp_path / 'two'}", *overrides, torchrun=True))
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert single["key"] == double["key"]  # the process count is not part of the result's identity
    one, two = ArtifactStore(f"file://{tmp_path / 'one'}"), ArtifactStore(f"file://{tmp_path / 'two'}")
    a = load_compressor(one, one.read_manifest("compressor", single["key"]))
    b = load_compressor(two, two.read_manifest("compressor", double["key"]))
    torch.testing.assert_close(a.weight, b.weight, atol=1e-5, rtol=1e-4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the seeded orthogonal init both runs started from
        init = LinearCompressor(64, 16)
    assert not torch.allclose(a.weight, init.weight, atol=1e-3)  # training moved the weights: the match is not trivial


def test_wandb_offline_tracking_writes_a_local_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg("tracking.wandb=offline", "compressor.solver=sgd", "compressor.max_steps=4")
    store, hiddens, basis = _stage1(cfg)
    run_compressor(cfg, store, hiddens, basis)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.rglob("*"))[:20]


def test_bf16_mixed_precision_and_gradient_accumulation_train() -> None:
    cfg = _cfg(
        "compressor.solver=closed_form+sgd",
        "compressor.mixed_precision=bf16",
        "compressor.grad_accum=3",
        "compressor.max_steps=6",
    )
    store, hiddens, basis = _stage1(cfg)
    manifest = run_compressor(cfg, store, hiddens, basis)
    assert manifest.metrics["sgd"]["steps"] == 6
    assert manifest.metrics["test"]["r2"] > 0.3  # started from the exact solution and stayed near it


def test_a_checkpoint_from_another_model_is_a_clear_error() -> None:
    cfg = _cfg("compressor.solver=sgd", "compressor.max_steps=4")
    store, hiddens, basis = _stage1(cfg)
    key, _ = stage.compressor_key(cfg, hiddens, basis, "1a", None)
    wrong = {"weight": torch.zeros(8, 32), "mean": torch.zeros(32)}  # D=32: another model's compressor
    CheckpointManager(store, "compressor", key).save(2, {"model": wrong, "progress": {}})
    with pytest.raises(UserError, match="does not fit this model.*Delete"):
        run_compressor(cfg, store, hiddens, basis)
    assert store.list_keys("compressor") == []
