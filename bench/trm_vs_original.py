"""TRM training speed, ours beside a re-implementation of the original LLM-TRM training step, on the same
batches with the same thread settings; and what the `trm` stage's own evaluation costs.

    ./run python -m bench.trm_vs_original [--preset local] [--threads 1] [--epochs 2] [--repeats 2]

Data: a pairs artifact in a temporary file:// store (the project's writer and reader), --train pairs (val
and test in the proportions of the generated problem sources: 1/9 and 0.28 of train) with pre lengths
uniform in [pre_len/2, 3·pre_len/2], D' and every TRM shape from the preset. Both trainers see the
batches of `PairData.iter_batches("train", batch_size, seed, epoch)` for the same epochs, and the same
`torch.set_num_threads` (default 1: the TRM's matrices are small, and on a loaded 2-core machine a second
intra-op thread mostly spins, which inflates the CPU time of both trainers alike).

Ours = `llm_trm_core.trm.train.train_trm` as the `trm` stage calls it (progress, scheduler, EMA, halting
target, its per-epoch validation); its training time excludes the validation, which is timed apart.

The original (re-implemented here from its description in docs/original-llm-trm.md, sections 5.2 to 5.7;
no code of it is used), one optimizer update per supervision step:
- network: `n_layers` pre-norm blocks, x + MHA(RMSNorm(x)) with `nn.MultiheadAttention` (bias, dropout 0.1,
  key padding mask), then x + MLP(RMSNorm(x)), MLP = Linear(D', 4D') + GELU + Linear(4D', D') with
  biases; no positions; a learned reasoning token appended after the padded context; one shared output
  RMSNorm; a halt head Linear(D', 1) with a sigmoid;
- y = z = 0; per supervision step T−1 latent recursions without gradients and one with; a latent
  recursion is n times z ← norm(net(x + y + z)), then y ← norm(net(y + z));
- prediction y at the reasoning position; loss = MSE(pred, target) + 0.5 · BCE(clamped sigmoid, 1[cos >
  threshold]) (the halting loss of the reported run); zero_grad, backward, clip 1.0, AdamW (wd 0.1,
  betas 0.9/0.95), cosine LR step, EMA of every parameter (0.999) updated parameter by parameter, the
  step's metrics (mse, mean cosine, relative error) read back as Python floats, y and z detached.
Same parameter count as ours with the preset's shapes (checked, printed), same recursion counts.

Figures: samples per CPU-second (a sample = one pair through one supervision step, i.e. batch size ×
updates; CPU time of this process, `time.process_time`, so other load on the machine counts less than in
wall time), both trainers and the ratio ours / original; the evaluation fraction = (per-epoch validation +
the stage's test evaluation: every supervision step with EMA weights, the raw weights, the final
predictions; `llm_trm_core.stages.trm.evaluate_test`, here without the LM head) / training time, measured
over --epochs and scaled to the preset's epochs (validation and training grow with the epochs, the test
evaluation does not). Each trainer's figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import emit, log
from llm_trm_core.arrow import STATE_WRITE_OPTIONS
from llm_trm_core.config import PipelineConfig, load_config
from llm_trm_core.datagen.generate import PairStates
from llm_trm_core.datagen.records import pairs_to_table
from llm_trm_core.models.trm import SequenceTRM
from llm_trm_core.stages.trm import evaluate_test, input_statistics, trm_kwargs
from llm_trm_core.store import ArtifactStore
from llm_trm_core.trm.data import PairBatch, PairData
from llm_trm_core.trm.pairs import META_FILE, PAIRS_STAGE, SCHEMA_NAME, SCHEMA_VERSION, PairsReader, pairs_schema
from llm_trm_core.trm.train import relative_errors, train_trm


def write_pairs(root: str, d: int, counts: dict[str, int], pre_len: int) -> PairData:
    store = ArtifactStore(root)
    rng = np.random.default_rng(0)
    schema = pairs_schema(d, "float32", {})
    direction = rng.standard_normal(d).astype(np.float32) * 3  # a shared mean, as compressed LM states have
    files: dict[str, list[str]] = {}
    with store.writer(PAIRS_STAGE, uuid.uuid4().hex, config={}, code_version="0") as w:
        for split, n in counts.items():
            pairs = []
            for j in range(n):
                length = int(rng.integers(pre_len // 2, pre_len * 3 // 2 + 1))
                pre = rng.standard_normal((length, d)).astype(np.float32) + direction
                post = pre.mean(0) + 0.3 * rng.standard_normal(d).astype(np.float32)
                pairs.append(PairStates(f"{split}-{j}", split, torch.from_numpy(pre), torch.from_numpy(post)))
            name = f"shards/{split}/part-00000.parquet"
            with w.open(name) as f:
                pq.write_table(pairs_to_table(pairs, d, "float32", schema=schema), f, **STATE_WRITE_OPTIONS)
            files[split] = [name]
        meta = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "d_prime": d, "dtype": "float32",
                "files": files, "pairs": counts}  # fmt: skip
        w.write_json(META_FILE, meta)
        manifest = w.commit()
    return PairData(PairsReader(store, manifest))


def real_pairs(uri: str) -> PairData:
    """A committed pairs artifact, `<store root>/pairs/<key>`."""
    root, _, key = uri.rstrip("/").rpartition(f"/{PAIRS_STAGE}/")
    manifest = ArtifactStore(root).read_manifest(PAIRS_STAGE, key)
    if manifest is None:
        raise SystemExit(f"no committed pairs artifact at {uri}")
    return PairData(PairsReader(ArtifactStore(root), manifest))


class OriginalBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class OriginalTRM(nn.Module):
    def __init__(self, d: int, n_layers: int, n_heads: int, dropout: float, n_latent: int, t_recursions: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(OriginalBlock(d, n_heads, dropout) for _ in range(n_layers))
        self.reasoning_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.halt_head = nn.Linear(d, 1)
        self.output_norm = nn.RMSNorm(d)
        self.n_latent, self.t_recursions = n_latent, t_recursions

    def net(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, pad)
        return h

    def latent(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for _ in range(self.n_latent):
            z = self.output_norm(self.net(x + y + z, pad))
        y = self.output_norm(self.net(y + z, pad))
        return y, z

    def deep(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            for _ in range(self.t_recursions - 1):
                y, z = self.latent(x, y, z, pad)
        return self.latent(x, y, z, pad)


class OriginalTrainer:
    """The original's per-batch training (module docstring)."""

    def __init__(self, model: OriginalTRM, n_sup: int, total_batches: int) -> None:
        self.model, self.n_sup = model, n_sup
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, int(0.9 * total_batches)))
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.threshold = 0.7

    def batch(self, batch: PairBatch) -> None:
        m = self.model
        b = batch.pre.shape[0]
        x = torch.cat([batch.pre, m.reasoning_token.expand(b, 1, -1)], dim=1)
        pad = torch.cat([batch.mask, torch.ones(b, 1)], dim=1) == 0
        y, z = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(self.n_sup):
            y, z = m.deep(x, y, z, pad)
            pred = y[:, -1]
            p = torch.sigmoid(m.halt_head(pred)).squeeze(-1)
            cos = F.cosine_similarity(pred, batch.post, dim=-1)
            halt_target = (cos > self.threshold).float()
            mse = F.mse_loss(pred, batch.post)
            loss = mse + 0.5 * F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), halt_target)
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                for name, param in m.named_parameters():
                    self.shadow[name] = 0.999 * self.shadow[name] + 0.001 * param.detach()
                _metrics = (mse.item(), cos.mean().item(), float(relative_errors(pred, batch.post).mean()))
            y, z = y.detach(), z.detach()


def run_original(cfg: PipelineConfig, data: PairData, epochs: int, seed: int) -> tuple[float, int]:
    t = cfg.trm
    torch.manual_seed(seed)
    model = OriginalTRM(data.d_prime, t.n_layers, t.n_heads, t.dropout, t.n_latent, t.t_recursions).train()
    trainer = OriginalTrainer(model, t.n_supervision, epochs * data.batches_per_epoch("train", t.batch_size))
    samples = 0
    cpu = 0.0
    for epoch in range(epochs):
        for batch in data.iter_batches("train", t.batch_size, seed=seed, epoch=epoch):
            start = time.process_time()
            trainer.batch(batch)
            cpu += time.process_time() - start
            samples += batch.pre.shape[0] * t.n_supervision
    return cpu, samples


def parameter_counts(cfg: PipelineConfig, d: int) -> tuple[int, int]:
    t = cfg.trm
    ours = SequenceTRM(**trm_kwargs(cfg, d))
    original = OriginalTRM(d, t.n_layers, t.n_heads, t.dropout, t.n_latent, t.t_recursions)
    return sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in original.parameters())


def run_ours(cfg: PipelineConfig, data: PairData, seed: int) -> dict[str, float]:
    """train_trm as the stage calls it, then the stage's test evaluation; CPU seconds of each part."""
    t = cfg.trm
    train = list(data.iter_pairs("train"))
    targets = torch.stack([p.post for p in train])
    target_mean = targets.mean(0)
    threshold = float(torch.quantile(relative_errors(target_mean.expand_as(targets), targets), t.halt_quantile))
    torch.manual_seed(seed)
    model = SequenceTRM(**trm_kwargs(cfg, data.d_prime))
    model.set_normalization(*input_statistics(data), target_mean, targets.std(0))
    device = torch.device("cpu")
    result, ema = train_trm(
        model, data, t, seed=seed, device=device, halt_threshold=threshold, target_mean=target_mean,
        halt_quantile=t.halt_quantile,
    )  # fmt: skip
    final = ema.module if ema is not None else model
    assert isinstance(final, SequenceTRM)
    start = time.process_time()
    evaluate_test(final, model, data, t, target_mean, threshold, None, device)
    test_cpu = time.process_time() - start
    return {
        "train_cpu": result.train_cpu_seconds,
        "validate_cpu": result.validate_cpu_seconds,
        "test_cpu": test_cpu,
        "samples": result.steps * t.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both trainers")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=32, help="training pairs (val 1/9 and test 0.28 of it)")
    parser.add_argument("--pre-len", type=int, default=80, help="mean pre length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pairs", default=None, metavar="ROOT/pairs/KEY",
        help="a committed pairs artifact (e.g. file:///path/artifacts/pairs/<key> of a local run): its real pairs "
        "instead of synthetic ones (--train and --pre-len are then ignored)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset_epochs = load_config(args.preset).trm.epochs
    cfg = load_config(args.preset, [f"trm.epochs={args.epochs}"])
    d, t = cfg.compressor.d_prime, cfg.trm
    ours_params, original_params = parameter_counts(cfg, d)
    # the splits' proportions of the generated sources (test 0.2, val 0.1 of the rest): train 0.72, val 0.08
    val, test = max(1, round(args.train / 9)), max(1, round(args.train * 0.2 / 0.72))
    shape = {"preset": args.preset, "d_prime": d, "batch": t.batch_size, "pre_len": args.pre_len,
             "train_pairs": args.train, "epochs": args.epochs, "n_supervision": t.n_supervision,
             "n_latent": t.n_latent, "t_recursions": t.t_recursions, "n_layers": t.n_layers,
             "params_ours": ours_params, "params_original": original_params}  # fmt: skip
    if ours_params != original_params:
        log(f"parameter counts differ: ours {ours_params}, original {original_params}")
    with tempfile.TemporaryDirectory(prefix="bench-trm-") as tmp:
        counts = {"train": args.train, "val": val, "test": test}
        data = real_pairs(args.pairs) if args.pairs else write_pairs(f"file://{Path(tmp)}", d, counts, args.pre_len)
        if args.pairs:
            shape.update(source=args.pairs, train_pairs=data.count("train"), pre_len=None)
        best_original, best_ours = math.inf, math.inf
        ours: dict[str, float] = {}
        for _ in range(args.repeats):
            cpu, samples = run_original(cfg, data, args.epochs, args.seed)
            best_original = min(best_original, cpu / samples)
            run = run_ours(cfg, data, args.seed)
            if run["train_cpu"] / run["samples"] < best_ours:
                best_ours, ours = run["train_cpu"] / run["samples"], run
    load = Path("/proc/loadavg").read_text().split()[:3]
    emit("trm_original_samples_per_cpu_s", 1 / best_original, "samples/CPU-s", loadavg=load, **shape)
    emit("trm_ours_samples_per_cpu_s", 1 / best_ours, "samples/CPU-s", loadavg=load, **shape)
    emit("trm_ours_over_original", best_original / best_ours, "ratio", loadavg=load, **shape)
    evaluation = ours["validate_cpu"] + ours["test_cpu"]
    emit("trm_eval_fraction", evaluation / ours["train_cpu"], "fraction of training CPU time", loadavg=load,
         validate_cpu_s=round(ours["validate_cpu"], 2), test_cpu_s=round(ours["test_cpu"], 2),
         train_cpu_s=round(ours["train_cpu"], 2), **shape)  # fmt: skip
    # the stage runs the preset's epochs: validation and training scale with them, the test evaluation does not
    scale = preset_epochs / args.epochs
    at_preset = (ours["validate_cpu"] * scale + ours["test_cpu"]) / (ours["train_cpu"] * scale)
    emit("trm_eval_fraction_at_preset_epochs", at_preset, "fraction of training CPU time", loadavg=load,
         preset_epochs=preset_epochs, **shape)  # fmt: skip


if __name__ == "__main__":
    main()
