"""TRM training with deep supervision, and evaluation after every supervision step.

Per batch: prepare the input, carry (y, z) = 0, then for s = 1..N_sup: one supervision step (T−1
recursions without gradients, one with), loss = MSE(prediction, target) + w · BCE-with-logits(halt,
target_s), optimizer step, LR scheduler step, EMA update, carry detached. A non-finite loss resets the
carried state to its initial value and skips that update (counted). Checkpoints (model, EMA,
optimizer, scheduler, RNG, data position) are taken between batches, so resume is exact.

Halting target (documented choice): 1 when the step's relative error ‖p − t‖/‖t‖ is below a
running `halt_quantile` quantile of the relative errors at the *last* supervision step (an EMA of the
batch quantiles, started from the training-mean predictor's quantile), i.e. "this prediction is
already as good as a typical finished one, further steps are not needed". Because the threshold
follows the model's own final errors, the target is neither constant 0 (a weak model never beating
a fixed bar) nor constant 1 (the original's 0.95 × mean cosine); the positive rate is reported per step.

EMA (evaluation and export) uses the usual warm-up, decay_t = min(decay, (1 + t) / (10 + t)), so short
runs are not evaluated on weights that are still mostly the initialisation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from llm_trm_core.config import TRMConfig
from llm_trm_core.metrics import LMHead, ReconstructionMetrics
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.models.trm import Carry, SequenceTRM
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.training.loop import Progress, TrainLoop, TrainState
from llm_trm_core.training.schedules import lr_multiplier, make_scheduler
from llm_trm_core.trm.data import PairBatch, PairData

logger = logging.getLogger(__name__)


class Head(Protocol):
    def logits(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DecompressedHead:
    """LM-head logits of a compressed vector: decompress to D, then the LM's head (after its final norm)."""

    compressor: LinearCompressor
    head: LMHead

    def logits(self, c: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.compressor.decompress(c.float()))


EVAL_BATCH_PAIRS = 64  # evaluation batches: no gradients, so larger batches than training cost no memory to speak of


def eval_batch_size(batch_size: int) -> int:
    """Pairs per evaluation batch: at least the training batch, and at least EVAL_BATCH_PAIRS (fewer, larger
    forward passes; the per-pair results do not depend on the batching beyond float rounding)."""
    return max(batch_size, EVAL_BATCH_PAIRS)


def relative_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).norm(dim=-1) / target.float().norm(dim=-1).clamp_min(1e-12)


@dataclass
class TRMResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    nan_resets: int = 0
    halt_positive_rate_train: list[float] = field(default_factory=list)
    halt_threshold: float = math.nan
    resumed_from: int | None = None
    seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # process CPU time of the training steps (validation excluded)
    validate_cpu_seconds: float = 0.0  # process CPU time of the per-epoch validation


def make_ema(model: SequenceTRM, decay: float | None) -> AveragedModel | None:
    if decay is None:
        return None

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor | int) -> None:
        rate = min(decay, (1.0 + float(count)) / (10.0 + float(count)))
        torch._foreach_lerp_(averaged, current, 1.0 - rate)  # averaged += (1 − rate)(current − averaged), fused

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)  # type: ignore[arg-type]


def eval_model(model: SequenceTRM, ema: AveragedModel | None) -> SequenceTRM:
    module = ema.module if ema is not None else model
    assert isinstance(module, SequenceTRM)
    return module


@torch.inference_mode()
def evaluate_steps(
    model: SequenceTRM,
    data: PairData,
    split: str,
    n_steps: int,
    target_mean: torch.Tensor,
    halt_threshold: float,
    head: Head | None,
    batch_size: int,
    device: torch.device,
    final: list[torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Held-out metrics after each supervision step s = 1..n_steps (all steps run, as the TRM paper evaluates).
    `final`, when given, receives the raw-scale predictions of the last step (CPU), batch by batch, in the
    split's pair order."""
    was_training = model.training
    model.eval()
    trackers = [
        ReconstructionMetrics(target_mean, head, lm_head_tokens=1 << 30, r2_against_train_mean=True)  # type: ignore[arg-type]
        for _ in range(n_steps)
    ]
    halt_pos = [0.0] * n_steps
    halt_hit = [0.0] * n_steps
    count = 0
    for batch in data.iter_batches(split, batch_size):
        batch = batch.to(device)
        steps = model.predict_steps(batch.pre, batch.mask, n_steps)
        if final is not None:
            final.append(steps[-1][0].float().cpu())
        for s, (prediction, halt) in enumerate(steps):
            trackers[s].update(batch.post.float(), prediction.float())
            target = relative_errors(prediction, batch.post) < halt_threshold
            halt_pos[s] += float(target.float().sum())
            halt_hit[s] += float(((halt > 0) == target).float().sum())
        count += batch.post.shape[0]
    model.train(was_training)
    rows = []
    for s, tracker in enumerate(trackers):
        metrics = tracker.compute()
        metrics.pop("tokens", None)
        rows.append(
            {"step": s + 1, **metrics, "halt_target_rate": halt_pos[s] / count, "halt_accuracy": halt_hit[s] / count}
        )
    return rows


@dataclass
class TRMProgress(Progress):
    halt_threshold: float = math.nan  # the running halting-target threshold (module docstring)
    halt_pos: list[float] = field(default_factory=list)  # halting targets that were 1, per supervision step
    halt_n: list[float] = field(default_factory=list)  # halting targets seen, per supervision step


def train_trm(
    model: SequenceTRM,
    data: PairData,
    cfg: TRMConfig,
    *,
    seed: int,
    device: torch.device,
    halt_threshold: float,
    target_mean: torch.Tensor,
    halt_quantile: float = 0.5,
    checkpoints: CheckpointManager | None = None,
    tracker: Tracker | None = None,
) -> tuple[TRMResult, AveragedModel | None]:
    start_time, start_cpu = time.perf_counter(), time.process_time()
    validate_cpu = 0.0
    n_sup = cfg.n_supervision
    total_steps = cfg.epochs * data.batches_per_epoch("train", cfg.batch_size) * n_sup
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))
    scheduler = make_scheduler(
        optimizer, lr_multiplier(cfg.schedule, total_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)
    )
    ema = make_ema(model, cfg.ema_decay)
    autocast_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" and device.type == "cuda" else None
    progress = TRMProgress(halt_threshold=halt_threshold, halt_pos=[0.0] * n_sup, halt_n=[0.0] * n_sup)
    loop = TrainLoop(
        "trm",
        TrainState({"model": model}, optimizer, scheduler, progress, ema),
        lr_name="trm.lr",
        checkpoints=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_unit="batch",
        max_steps=total_steps,
        nonfinite="skip",  # the carried state is reset instead (module docstring)
        tracker=tracker,
    )
    loop.resume()

    def validate() -> None:
        nonlocal validate_cpu
        started = time.process_time()
        rows = evaluate_steps(
            eval_model(model, ema), data, "val", n_sup, target_mean, progress.halt_threshold, None,
            eval_batch_size(cfg.batch_size), device,
        )  # fmt: skip
        final = rows[-1]
        point = {"epoch": progress.epoch, "step": progress.step, "val_mse": final["mse"], "val_r2": final["r2"]}
        progress.history.append(point)
        logger.info("epoch %d step %d: val mse %.5g r2 %.4f", progress.epoch, progress.step, final["mse"], final["r2"])
        loop.log({"val_mse": final["mse"], "val_r2": final["r2"]})
        validate_cpu += time.process_time() - started

    def step(pair_batch: PairBatch, index: int) -> None:
        """One batch: N_sup supervision steps, each its own optimizer update, the carry detached in between."""
        batch = pair_batch.to(device)
        prepared = model.prepare(batch.pre, batch.mask)
        carry: Carry = model.initial_carry(prepared)
        for s in range(n_sup):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                carry, prediction, halt = model.supervision_step(prepared, carry)
            mse = F.mse_loss(prediction.float(), model.standardize_target(batch.post))  # scale-free loss
            errors = relative_errors(model.denormalize(prediction.detach()), batch.post)
            halt_target = (errors < progress.halt_threshold).float()
            loss = mse + cfg.halt_weight * F.binary_cross_entropy_with_logits(halt.float(), halt_target)
            if not loop.finite(loss):
                carry = model.initial_carry(prepared)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            carry = carry.detach()
            if s == n_sup - 1:  # follow the typical last-step error
                batch_q = float(torch.quantile(errors, halt_quantile))
                progress.halt_threshold = 0.9 * progress.halt_threshold + 0.1 * batch_q
            progress.halt_pos[s] += float(halt_target.sum())
            progress.halt_n[s] += float(halt_target.numel())
            loop.updated({"loss": loss.item(), "mse": mse.item(), "lr": scheduler.get_last_lr()[0]})
            if loop.budget_spent:
                return

    loop.run_epochs(
        cfg.epochs, lambda epoch: data.iter_batches("train", cfg.batch_size, seed=seed, epoch=epoch), step, validate
    )
    if not progress.history or progress.history[-1]["step"] != progress.step:
        validate()
    rates = [p / n if n else math.nan for p, n in zip(progress.halt_pos, progress.halt_n, strict=True)]
    result = TRMResult(
        history=progress.history,
        steps=progress.step,
        nan_resets=progress.skipped,
        halt_positive_rate_train=rates,
        halt_threshold=float(progress.halt_threshold),
        resumed_from=loop.resumed_from,
        seconds=time.perf_counter() - start_time,
        train_cpu_seconds=time.process_time() - start_cpu - validate_cpu,
        validate_cpu_seconds=validate_cpu,
    )
    return result, ema
