"""SGD (AdamW) training of the linear compressor on cached hidden states.

One optimizer step = `grad_accum` micro-batches of `batch_tokens` tokens (the global batch is split
across processes under torchrun/accelerate). The LR schedule steps once per optimizer step. The data
order is a pure function of (seed, epoch), and checkpoints hold model, optimizer, scheduler, RNG,
data position and early-stopping state, so a resumed run reproduces the uninterrupted one exactly.
Early stopping watches the held-out `val` split, never the training loss; the best weights are kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from llm_trm_core.config import CompressorConfig
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import HiddenStates
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.training.loop import Progress, TrainLoop, TrainState
from llm_trm_core.training.schedules import lr_multiplier, make_scheduler

logger = logging.getLogger(__name__)


@dataclass
class SGDResult:
    weights: dict[str, torch.Tensor]  # best held-out weights
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_val_mse: float = math.inf
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds: float = 0.0


@torch.no_grad()
def heldout_mse(model: LinearCompressor, states: HiddenStates, split: str, batch_tokens: int = 8192) -> float:
    total, count = 0.0, 0
    device = model.weight.device
    for batch in states.iter_batches(split, batch_tokens):
        x = batch.to(device)
        total += float(F.mse_loss(model(x), x, reduction="sum"))
        count += x.numel()
    if count == 0:
        raise UserError(f"the hidden-state split {split!r} is empty: nothing to evaluate on")
    return total / count


@dataclass
class SGDProgress(Progress):
    best_val_mse: float = math.inf
    best_step: int = 0
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def train_sgd(
    model: LinearCompressor,
    states: HiddenStates,
    cfg: CompressorConfig,
    *,
    seed: int,
    accelerator: Accelerator,
    checkpoints: CheckpointManager | None = None,
    tracker: Tracker | None = None,
) -> SGDResult:
    start_time = time.perf_counter()
    n_batches = states.batches_per_epoch("train", cfg.batch_tokens)
    if n_batches == 0:
        raise UserError("there are no training hidden states: the corpus produced no tokens")
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(
        optimizer,
        lr_multiplier(cfg.schedule, total_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction),
    )
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if cfg.compile:
        prepared = torch.compile(prepared)
    core: LinearCompressor = accelerator.unwrap_model(prepared)

    progress = SGDProgress(best_weights={k: v.detach().cpu().clone() for k, v in core.state_dict().items()})
    loop = TrainLoop(
        "compressor",
        TrainState({"model": core}, optimizer, scheduler, progress),
        lr_name="compressor.lr",
        checkpoints=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_unit="step",
        max_steps=total_steps,
        tracker=tracker,
        is_main_process=accelerator.is_main_process,
        barrier=accelerator.wait_for_everyone,
    )
    loop.resume()

    def evaluate() -> None:
        """Held-out check; sets `stopped` when early stopping triggers."""
        prepared.eval()
        val = heldout_mse(core, states, "val")
        prepared.train()
        improved = val < progress.best_val_mse * (1 - cfg.min_delta)
        if improved:
            progress.best_val_mse, progress.best_step, progress.bad_evals = val, progress.step, 0
            progress.best_weights.update({k: v.detach().cpu().clone() for k, v in core.state_dict().items()})
        else:
            progress.bad_evals += 1
        progress.history.append({"step": progress.step, "val_mse": val, "lr": scheduler.get_last_lr()[0]})
        loop.log({"val_mse": val})
        logger.info("step %d: val mse %.6g%s", progress.step, val, " (best)" if improved else "")
        if progress.bad_evals >= cfg.patience:
            progress.stopped = True

    device = accelerator.device

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        return states.iter_batches(
            "train",
            cfg.batch_tokens,
            seed=seed,
            epoch=epoch,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )

    def step(batch: torch.Tensor, index: int) -> None:
        """One micro-batch; the optimizer steps on the last micro-batch of each `grad_accum` group."""
        group_start = index - index % cfg.grad_accum
        group_size = min(cfg.grad_accum, n_batches - group_start)
        last_micro = index - group_start == group_size - 1
        x = batch.to(device)
        sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(prepared)
        with sync, accelerator.autocast():
            loss = F.mse_loss(prepared(x).float(), x)
            loop.finite(loss)
            accelerator.backward(loss / group_size)
        if not last_micro:
            return
        accelerator.clip_grad_norm_(prepared.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loop.updated({"loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
        if cfg.eval_every and progress.step % cfg.eval_every == 0:
            evaluate()

    def end_of_epoch() -> None:
        if cfg.eval_every is None:
            evaluate()

    prepared.train()
    loop.run_epochs(cfg.epochs, batches, step, end_of_epoch)
    evaluated_last = progress.history and progress.history[-1]["step"] == progress.step
    if not evaluated_last:
        evaluate()
    return SGDResult(
        weights=progress.best_weights,
        history=progress.history,
        steps=progress.step,
        best_step=progress.best_step,
        best_val_mse=progress.best_val_mse,
        stopped_early=progress.stopped,
        resumed_from=loop.resumed_from,
        seconds=time.perf_counter() - start_time,
    )
