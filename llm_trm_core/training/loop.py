"""One training loop for every trained stage (docs/architecture.md, "Training loop").

A trainer (compressor SGD, TRM, latent projection, GRPO) builds a `TrainState` (its weights, optimizer,
LR scheduler, optional EMA and a typed `Progress`) and hands `TrainLoop` a step function that does the
forward pass, the backward pass and the optimizer update of one batch. Everything around the step
lives here, once:

- resume: the newest complete checkpoint restores the weights, EMA, optimizer, scheduler, RNG (CPU and
  every CUDA device) and progress, so a resumed run takes exactly the steps an uninterrupted one takes;
- data position: `Progress.epoch` and `Progress.batch`; the batches an epoch consumed before the
  checkpoint are skipped (data order is a pure function of (seed, epoch), or of the step);
- checkpoint cadence: every `checkpoint_every` optimizer steps or batches (`checkpoint_unit`), never
  once the step budget (`max_steps`) is spent: the stage commits its artifact then;
- a progress bar (tqdm, shown on a terminal only) and tracker logging (`TrainLoop.log`, metric names
  prefixed with the loop's name, at the current optimizer step);
- the non-finite-loss policy.

Non-finite-loss policy: a non-finite loss never reaches the optimizer. A step function asks
`TrainLoop.finite(loss)` before `backward()`. By default (`nonfinite="raise"`) that raises
`TrainingDivergedError`: nothing is committed, the last checkpoint stays, and the message names the
learning rate to lower. In a regression or likelihood objective a NaN or Inf means the run diverged,
and skipping it would hide that. A step that can recover opts into `nonfinite="skip"`: `finite` clears
the gradients, counts the loss in `Progress.skipped`, logs a warning and returns False; the step then
skips its update and resets its own recoverable state. Only the TRM does: its carried (y, z) goes back to
its initial value, since the recursion can overflow on one batch while the weights are fine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, Literal, TypeVar

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from llm_trm_core.errors import UserError
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager, Stateful

logger = logging.getLogger(__name__)

NonFinitePolicy = Literal["raise", "skip"]
CheckpointUnit = Literal["step", "batch"]


_END = object()  # no more batches in the epoch


class TrainingDivergedError(UserError):
    """The loss became NaN or Inf."""


def require_finite(loss: torch.Tensor, name: str, step: int, lr_name: str, lr: float) -> None:
    """The `raise` policy on its own, for steps that run outside a `TrainLoop` (one GRPO learner step)."""
    if not torch.isfinite(loss):
        raise TrainingDivergedError(
            f"{name} training diverged at step {step}: the loss became {loss.item()}; lower {lr_name} (now {lr}) "
            "or check its inputs. The last checkpoint is kept."
        )


@dataclass
class Progress:
    """Where training stands. Plain values and tensors only: checkpoints load with `weights_only=True`.

    A trainer with more to carry across a resume (best weights, a running threshold) subclasses it."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # batches of the current epoch consumed
    batches: int = 0  # batches consumed in all
    skipped: int = 0  # non-finite losses whose update was skipped (policy "skip")
    stopped: bool = False  # set by a step or an end-of-epoch hook to end training (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


P = TypeVar("P", bound=Progress)
B = TypeVar("B")


def _cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


@dataclass
class TrainState(Generic[P]):
    """Everything a checkpoint holds: `models` by name (what the step trains), EMA, optimizer, scheduler,
    the RNG states and the progress."""

    models: dict[str, Stateful]
    optimizer: Optimizer
    scheduler: LRScheduler
    progress: P
    ema: AveragedModel | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: _cpu(model.state_dict()) for name, model in self.models.items()}
        if self.ema is not None:
            state["ema"] = _cpu(self.ema.state_dict())
        state["optimizer"] = self.optimizer.state_dict()
        state["scheduler"] = self.scheduler.state_dict()
        state["rng"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        state["progress"] = self.progress.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any], restore: Callable[[Stateful, Any], None]) -> None:
        """`restore(target, saved)` loads weights or explains why they do not fit (CheckpointManager.restore)."""
        for name, model in self.models.items():  # weights first: a checkpoint of another model fails here
            restore(model, state[name])
        if self.ema is not None:
            restore(self.ema, state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.progress.load_state_dict(state["progress"])


class TrainLoop(Generic[P]):
    """Runs a step function over batches with resume, checkpoints, progress bar, tracking and the
    non-finite-loss policy (module docstring). A step function calls `finite(loss)` before backward and
    `updated(metrics)` after each optimizer update."""

    def __init__(
        self,
        name: str,
        state: TrainState[P],
        *,
        lr_name: str,
        checkpoints: CheckpointManager | None = None,
        checkpoint_every: int = 1,
        checkpoint_unit: CheckpointUnit = "batch",
        max_steps: int | None = None,
        total_steps: int | None = None,
        nonfinite: NonFinitePolicy = "raise",
        tracker: Tracker | None = None,
        is_main_process: bool = True,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.state = state
        self.lr_name = lr_name
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self.checkpoint_unit = checkpoint_unit
        self.max_steps = max_steps
        self.total_steps = total_steps if total_steps is not None else max_steps
        self.nonfinite = nonfinite
        self.tracker = tracker
        self.is_main_process = is_main_process
        self.barrier = barrier
        self.resumed_from: int | None = None
        self._bar: tqdm[Any] | None = None

    @property
    def progress(self) -> P:
        return self.state.progress

    @property
    def budget_spent(self) -> bool:
        return self.max_steps is not None and self.progress.step >= self.max_steps

    def resume(self) -> int | None:
        """Restore the newest complete checkpoint, if any; returns its position (None: a fresh start)."""
        if self.checkpoints is None or (latest := self.checkpoints.load_latest()) is None:
            return None
        position, saved = latest
        checkpoints = self.checkpoints
        self.state.load_state_dict(saved, lambda target, weights: checkpoints.restore(target, weights, position))
        self.resumed_from = position
        return position

    def save(self) -> None:
        """A checkpoint at the current position (written by the main process; every process waits)."""
        if self.checkpoints is None:
            return
        if self.is_main_process:
            position = self.progress.step if self.checkpoint_unit == "step" else self.progress.batches
            self.checkpoints.save(position, self.state.state_dict())
        if self.barrier is not None:
            self.barrier()

    def finite(self, loss: torch.Tensor) -> bool:
        """The non-finite-loss policy: True to go on with the update; False (policy "skip") to skip it."""
        if bool(torch.isfinite(loss)):
            return True
        if self.nonfinite == "raise":
            require_finite(loss, self.name, self.progress.step, self.lr_name, float(self.state.scheduler.base_lrs[0]))
        self.progress.skipped += 1
        self.state.optimizer.zero_grad(set_to_none=True)
        logger.warning("non-finite %s loss at step %d: update skipped", self.name, self.progress.step)
        return False

    def updated(self, metrics: Mapping[str, Any] | None = None) -> None:
        """One optimizer update done: count it, advance the bar, log `metrics` at the new step."""
        self.progress.step += 1
        if self._bar is not None:
            self._bar.update(1)
            if metrics and "loss" in metrics:
                self._bar.set_postfix(loss=f"{float(metrics['loss']):.4g}", refresh=False)
        if metrics:
            self.log(metrics)

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Numeric metrics to the tracker, as `{name}/{metric}` at the current optimizer step."""
        if self.tracker is not None:
            numeric = {f"{self.name}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
            self.tracker.log(numeric, step=self.progress.step)

    def _checkpoint_due(self, step_before: int) -> bool:
        p = self.progress
        if self.checkpoint_unit == "step":
            return p.step != step_before and p.step % self.checkpoint_every == 0
        return p.batches % self.checkpoint_every == 0

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[None]:
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            desc=self.name,
            unit="step",
            leave=False,
            dynamic_ncols=True,
            disable=None if self.is_main_process else True,  # None: shown on a terminal only
        )
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def run_epochs(
        self,
        epochs: int,
        batches: Callable[[int], Iterable[B]],
        step: Callable[[B, int], None],
        end_of_epoch: Callable[[], None] | None = None,
    ) -> P:
        """`step(batch, index)` for every batch of `batches(epoch)` not yet consumed, epoch after epoch, until
        `epochs` are done, the step budget is spent or `Progress.stopped` is set. `end_of_epoch` runs after
        each complete epoch (validation, early stopping), including one the step budget ends with."""
        p = self.progress
        with self._progress_bar():
            while p.epoch < epochs and not p.stopped and not self.budget_spent:
                epoch_batches = iter(batches(p.epoch))
                for index, batch in enumerate(epoch_batches):
                    if index < p.batch:
                        continue  # consumed before the checkpoint this run resumed from
                    step_before = p.step
                    step(batch, index)
                    p.batch, p.batches = index + 1, p.batches + 1
                    if p.stopped:
                        return p
                    if self.budget_spent:
                        if next(epoch_batches, _END) is not _END:
                            return p  # the budget ran out inside the epoch
                        break  # with the epoch's last batch: the epoch is complete
                    if self._checkpoint_due(step_before):
                        self.save()
                p.epoch += 1
                p.batch = 0
                if end_of_epoch is not None:
                    end_of_epoch()
        return p

    def run_steps(self, step: Callable[[int], None]) -> P:
        """`step(index)` for each step index from `Progress.step` until `max_steps`: for trainers whose data is
        a pure function of the step (GRPO). `step` calls `updated` once."""
        assert self.max_steps is not None, "run_steps needs max_steps"
        p = self.progress
        with self._progress_bar():
            while not self.budget_spent and not p.stopped:
                step_before = p.step
                step(p.step)
                p.batches += 1
                if self.budget_spent:
                    break
                if self._checkpoint_due(step_before):
                    self.save()
        return p
