"""Stage 2 model: the SequenceTRM, its baselines, training (halting, NaN guard, EMA), resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from llm_trm_core.config import load_config
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.errors import UserError
from llm_trm_core.faults import FAULT_ENV
from llm_trm_core.models import trm as trm_model
from llm_trm_core.models.trm import SequenceTRM
from llm_trm_core.stages.pairs import META_FILE, STAGE, _table, pairs_schema
from llm_trm_core.stages.trm import run_trm
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.trm.artifacts import load_trm
from llm_trm_core.trm.baselines import Features, fit_baselines, fit_knn, fit_ridge
from llm_trm_core.trm.data import PairData
from llm_trm_core.trm.pairs import PairsReader

REPO = Path(__file__).resolve().parent.parent


def _batch(b: int = 3, length: int = 5, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(b, length, d, generator=g)
    mask = torch.ones(b, length)
    mask[0, 3:] = 0
    return pre, mask


def test_shapes_recursion_and_gradients_reach_only_the_last_recursion() -> None:
    torch.manual_seed(0)
    model = SequenceTRM(16, n_heads=4, n_latent=2, t_recursions=3)
    pre, mask = _batch()
    prepared = model.prepare(pre, mask)
    assert prepared.x.shape == (3, 6, 16) and prepared.positions[0, -1] == 3  # token right after the context
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    _, prediction, halt = model.supervision_step(prepared, model.initial_carry(prepared))
    handle.remove()
    assert prediction.shape == (3, 16) and halt.shape == (3,)
    # T·(n+1) = 9 network calls: the first (T−1)·(n+1) = 6 without gradients, the last 3 with
    assert calls == [False] * 6 + [True] * 3
    prediction.sum().backward()
    assert model.reasoning_token.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    assert torch.sigmoid(halt).max() < 0.01  # halt head starts at bias −5


def test_padding_does_not_change_predictions_and_positions_matter_only_with_rope() -> None:
    torch.manual_seed(0)
    faithful = SequenceTRM(16, n_heads=4, n_latent=1, t_recursions=1, dropout=0.0).eval()
    rope = SequenceTRM(
        16, n_heads=4, n_latent=1, t_recursions=1, dropout=0.0, positions="rope", norm="post", mlp="swiglu"
    ).eval()
    pre, mask = _batch(b=1, length=4)
    padded = torch.cat([pre, torch.randn(1, 3, 16)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3)], dim=1)
    full = torch.ones_like(mask)
    flipped = pre.flip(1)
    for model in (faithful, rope):
        ((base, _),) = model.predict_steps(pre, mask, 1)
        ((with_pad, _),) = model.predict_steps(padded, padded_mask, 1)
        torch.testing.assert_close(base, with_pad, atol=1e-5, rtol=1e-4)
    ((a, _),) = faithful.predict_steps(pre, full, 1)
    ((b, _),) = faithful.predict_steps(flipped, full, 1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # the original is blind to order
    ((a, _),) = rope.predict_steps(pre, full, 1)
    ((b, _),) = rope.predict_steps(flipped, full, 1)
    assert not torch.allclose(a, b, atol=1e-4)  # with RoPE, order matters


def test_training_attention_is_sdpa_with_dropout_on_the_weights(monkeypatch) -> None:
    """The training path's attention (explicit, cheaper dropout draws) is softmax attention over the real keys;
    its dropout zeroes about p of the weights and keeps the expectation."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    monkeypatch.setattr(trm_model, "dropout_keep", lambda shape, p, dtype, device: torch.ones(shape, dtype=dtype))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(trm_model.dropout_attention(q, k, v, mask, 0.1), expected, atol=1e-6, rtol=1e-5)
    monkeypatch.undo()
    keep = trm_model.dropout_keep(torch.Size([200, 1000]), 0.1, torch.float32, torch.device("cpu"))
    assert abs(float((keep == 0).float().mean()) - 0.1) < 0.005
    assert abs(float(keep.mean()) - 1.0) < 0.01
    assert keep.unique().tolist() == [0.0, pytest.approx(65536 / round(0.9 * 65536))]


def test_bad_widths_are_clear_errors() -> None:
    with pytest.raises(UserError, match="not divisible by trm.n_heads=5"):
        SequenceTRM(16, n_heads=5)
    with pytest.raises(UserError, match="even head size"):
        SequenceTRM(12, n_heads=4, positions="rope")


def test_ridge_and_knn_baselines() -> None:
    g = torch.Generator().manual_seed(0)
    pairs = []
    w = torch.randn(8, 8, generator=g)
    for i in range(60):
        pre = torch.randn(4, 8, generator=g)
        pairs.append(PairStates(f"p{i}", "train", pre, pre.mean(0) @ w + 1.0))
    train, val = Features.of(pairs[:40]), Features.of(pairs[40:])
    ridge = fit_ridge(train, 1e-8)
    torch.testing.assert_close(ridge(val), val.target, atol=1e-6, rtol=1e-6)  # an exact linear map is recovered
    knn = fit_knn(train, 1)
    torch.testing.assert_close(knn(train), train.target)  # each training point is its own nearest neighbour
    predictors, chosen = fit_baselines(train, val, [1e-6, 10.0], [1, 5])
    assert chosen["ridge_lambda"] == 1e-6 and set(predictors) == {"mean", "last_pre", "mean_pool", "ridge", "knn"}


def _synthetic_pairs(
    store: ArtifactStore, d: int = 16, n: int = 300, seed: int = 0, bad_split: str | None = None
) -> Manifest:
    """A pairs artifact whose target is a learnable function of the pre sequence (one split may get D'+1)."""
    g = torch.Generator().manual_seed(seed)
    files: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    with store.writer(STAGE, uuid.uuid4().hex, config={}, code_version="test", upstream={"compressor": "none"}) as w:
        for split, size in (("train", n), ("val", n // 4), ("test", n // 4)):
            dim = d + 1 if split == bad_split else d
            mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed + 1)) / dim**0.5
            rows = []
            for i in range(size):
                pre = torch.randn(int(torch.randint(3, 9, (1,), generator=g)), dim, generator=g)
                target = 40.0 + 25.0 * (pre.mean(0) + 0.5 * torch.tanh(pre[-1] @ mix))  # LM-like offset and scale
                rows.append(PairStates(f"{split}{i}", split, 30.0 * pre, target))
            name = f"shards/{split}/part-00000.parquet"
            if rows:
                with w.open(name) as f:
                    pq.write_table(_table(rows, pairs_schema(dim, "float32", {})), f)
                files[split] = [name]
            counts[split] = size
        w.write_json(META_FILE, {"d_prime": str(d), "files": files, "pairs": counts})
        return w.commit({})


def _plain_batch(pairs: list[PairStates]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch built pair by pair: the reference for the vectorized gather."""
    width = max(max(p.pre.shape[0] for p in pairs), 1)
    pre, mask = torch.zeros(len(pairs), width, pairs[0].post.shape[0]), torch.zeros(len(pairs), width)
    for i, pair in enumerate(pairs):
        pre[i, : pair.pre.shape[0]], mask[i, : pair.pre.shape[0]] = pair.pre, 1
    return pre, mask, torch.stack([p.post for p in pairs])


def test_batches_gathered_from_flat_columns_equal_batches_built_pair_by_pair() -> None:
    """Files of 7, 1, 4 and 3 pairs (the last with empty pre sequences, a whole batch of them unshuffled);
    batches that span files; shuffled (seeded by the epoch) or not."""
    store = ArtifactStore(f"memory://trm-{uuid.uuid4().hex[:8]}")
    g = torch.Generator().manual_seed(3)
    written: dict[str, list[PairStates]] = {}
    with store.writer(STAGE, uuid.uuid4().hex, config={}, code_version="test", upstream={"compressor": "none"}) as w:
        for f, size in enumerate((7, 1, 4, 3)):
            lengths = [0] * size if f == 3 else torch.randint(1, 6, (size,), generator=g).tolist()
            rows = [PairStates(f"f{f}p{i}", "train", torch.randn(n, 4, generator=g), torch.randn(4, generator=g))
                    for i, n in enumerate(lengths)]  # fmt: skip
            name = f"shards/train/part-{f:05d}.parquet"
            with w.open(name) as out:
                pq.write_table(_table(rows, pairs_schema(4, "float32", {})), out)
            written[name] = rows
        w.write_json(META_FILE, {"d_prime": "4", "files": {"train": list(written)}, "pairs": {"train": 15}})
        data = PairData(PairsReader(store, w.commit({})))
    for batch_size, seed, epoch in ((3, None, 0), (4, 7, 0), (4, 7, 1), (16, 2, 0), (5, 2, 3)):
        batches = list(data.iter_batches("train", batch_size, seed=seed, epoch=epoch))
        by_id = {p.id: p for rows in written.values() for p in rows}
        order = [i for b in batches for i in b.ids]
        assert sorted(order) == sorted(by_id)
        assert [len(b.ids) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        if seed is None:
            assert order == [p.id for rows in written.values() for p in rows]
            assert batches[-1].pre.shape == (3, 1, 4) and not batches[-1].mask.any()  # the empty file, alone
        for batch in batches:
            pre, mask, post = _plain_batch([by_id[i] for i in batch.ids])
            assert torch.equal(batch.pre, pre) and torch.equal(batch.mask, mask) and torch.equal(batch.post, post)
    first = [b.ids for b in data.iter_batches("train", 4, seed=7, epoch=0)]
    assert first == [b.ids for b in data.iter_batches("train", 4, seed=7, epoch=0)]  # a pure function of the epoch
    assert first != [b.ids for b in data.iter_batches("train", 4, seed=7, epoch=1)]
    assert [p.id for p in data.iter_pairs("train")] == [p.id for rows in written.values() for p in rows]


def test_trm_trains_beside_baselines_with_a_non_vacuous_halting_target() -> None:
    store = ArtifactStore(f"memory://trm-{uuid.uuid4().hex[:8]}")
    pairs = _synthetic_pairs(store)
    cfg = load_config(
        "tiny",
        [f"store.root={store.root}", "trm.epochs=12", "trm.lr=0.002", "trm.dropout=0.0", "trm.batch_size=16",
         "trm.positions=rope", "trm.warmup_steps=5", "trm.weight_decay=0.0", "trm.n_latent=1", "trm.t_recursions=1"],
    )  # fmt: skip
    manifest = run_trm(cfg, store, pairs)
    m = manifest.metrics
    assert set(m["baselines"]) == {"mean", "last_pre", "mean_pool", "ridge", "knn"}
    assert [row["step"] for row in m["per_step"]] == [1, 2, 3]
    assert m["test"]["r2"] > m["baselines"]["mean"]["r2"] + 0.2  # it learned something a constant cannot
    assert m["baselines"]["mean"]["r2"] == pytest.approx(0.0, abs=1e-9)  # R² is against the TRAINING mean
    assert "r2_heldout_mean" in m["test"]
    v = m["verdict"]  # decided by a paired bootstrap of per-pair standardized errors over the test pairs
    assert v["metric"] == "std_mse" and v["n"] == 75 and v["ci_low"] <= v["difference"] <= v["ci_high"]
    expected = "better" if v["ci_low"] > 0 else "worse" if v["ci_high"] < 0 else "indistinguishable"
    assert v["verdict"] == expected and m["beats_best_baseline"] == (expected == "better")
    ablation = m["recursion_ablation"]
    assert ablation["metrics"]["std_mse"] > 0 and ablation["verdict"] in ("better", "worse", "indistinguishable")
    rates = m["halt"]["train_positive_rate_by_step"]
    assert all(0.0 < r < 1.0 for r in rates), rates  # the halting target is neither all 0 nor all 1
    assert m["training"]["nan_resets"] == 0
    report = store.open("trm", manifest.key).read_bytes("report.md").decode()
    assert "baseline: ridge" in report and "TRM step 3" in report
    assert "Verdict (deciding metric: per-pair MSE" in report and "ablation: T=1, n=1, N_sup=1" in report
    model = load_trm(store, manifest)
    reader = PairData(PairsReader(store, pairs))
    batch = next(reader.iter_batches("test", 4))
    (pred, _), *_ = model.predict_steps(batch.pre, batch.mask, 1)
    assert pred.shape == (4, 16)


def test_nan_guard_resets_the_carried_state(monkeypatch) -> None:
    store = ArtifactStore(f"memory://trm-{uuid.uuid4().hex[:8]}")
    pairs = _synthetic_pairs(store, n=16)
    original = SequenceTRM.supervision_step
    calls = {"n": 0}

    def flaky(self, prepared, carry):
        carry, prediction, halt = original(self, prepared, carry)
        calls["n"] += 1
        if calls["n"] == 2:
            prediction = prediction * float("nan")
        return carry, prediction, halt

    monkeypatch.setattr(SequenceTRM, "supervision_step", flaky)
    cfg = load_config("tiny", [f"store.root={store.root}", "trm.epochs=1"])
    manifest = run_trm(cfg, store, pairs)
    assert manifest.metrics["training"]["nan_resets"] == 1
    assert all(torch.isfinite(v).all() for v in load_trm(store, manifest).state_dict().values())


def test_bad_pairs_are_clear_errors() -> None:
    store = ArtifactStore(f"memory://trm-{uuid.uuid4().hex[:8]}")
    cfg = load_config("tiny", [f"store.root={store.root}"])
    with pytest.raises(UserError, match="holds vectors of size 17, but the artifact says D'=16"):
        run_trm(cfg, store, _synthetic_pairs(store, bad_split="train"))
    with pytest.raises(UserError, match="has no val/test pairs"):
        run_trm(cfg, store, _synthetic_pairs(store, n=2))
    pairs = _synthetic_pairs(store)
    other = pairs.model_copy(update={"key": "someone-else"})
    with pytest.raises(UserError, match="was made with compressor none, not the requested someone-else"):
        run_trm(cfg, store, pairs, compressor=other)
    assert store.list_keys("trm") == []


def _run_trm(root: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "flows.cli", "stage", "trm", "--preset", "tiny", "--store", root, *overrides]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    killed, straight = f"file://{tmp_path / 'killed'}", f"file://{tmp_path / 'straight'}"
    args = ["trm.checkpoint_every=2", "trm.epochs=2"]
    proc = _run_trm(killed, *args, env={FAULT_ENV: "checkpoint:4"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    store = ArtifactStore(killed)
    assert store.list_keys("trm") == []
    resumed = _run_trm(killed, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    key = json.loads(resumed.stdout.splitlines()[-1])["key"]
    manifest = store.read_manifest("trm", key)
    assert manifest is not None and manifest.metrics["training"]["resumed_from"] == 4
    done = _run_trm(straight, *args)
    other = ArtifactStore(straight)
    reference = other.read_manifest("trm", json.loads(done.stdout.splitlines()[-1])["key"])
    assert reference is not None and reference.key == key
    a, b = load_trm(store, manifest), load_trm(other, reference)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert manifest.metrics["per_step"] == reference.metrics["per_step"]


def test_linear_readout_starts_as_the_identity_and_trains() -> None:
    model = SequenceTRM(d=16, n_heads=4, readout="linear")
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.readout(x), x)
    pre, mask = torch.randn(2, 5, 16), torch.ones(2, 5)
    prepared = model.prepare(pre, mask)
    _, prediction, _ = model.supervision_step(prepared, model.initial_carry(prepared))
    prediction.pow(2).sum().backward()
    assert model.readout.weight.grad is not None and model.readout.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="unknown trm.readout"):
        SequenceTRM(d=16, n_heads=4, readout="mlp")


def test_r2_against_the_training_mean_by_hand() -> None:
    from llm_trm_core.metrics import ReconstructionMetrics

    mu = torch.tensor([1.0, 2.0])
    x = torch.tensor([[2.0, 2.0], [0.0, 4.0]])
    tracker = ReconstructionMetrics(mu, r2_against_train_mean=True)
    tracker.update(x, mu.expand_as(x))
    assert tracker.compute()["r2_train_mean"] == pytest.approx(0.0)  # the training mean scores exactly 0
    tracker = ReconstructionMetrics(mu, r2_against_train_mean=True)
    tracker.update(x, torch.tensor([[2.0, 2.0], [0.0, 3.0]]))  # SSE 1; around mu: 1 + 0 + 1 + 4 = 6
    m = tracker.compute()
    assert m["r2_train_mean"] == pytest.approx(1 - 1 / 6)
    assert m["r2"] == pytest.approx(1 - 1 / 4)  # around the held-out mean (1, 3): 1 + 1 + 1 + 1
