"""Learning-rate schedules stepped once per optimizer step (never per micro-batch or per process)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(
    schedule: Literal["cosine", "wsd", "constant"],
    total_steps: int,
    warmup_steps: int,
    min_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    """Factor of the peak LR after `step` optimizer steps: linear warmup, then the schedule.

    cosine: half-cosine from 1 to min_ratio over the remaining steps.
    wsd (warmup-stable-decay): flat at 1, then linear to min_ratio over the last `decay_fraction`.
    constant: 1 after warmup.
    """
    total = max(total_steps, 1)
    warmup = min(warmup_steps, total)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            span = max(total - warmup, 1)
            progress = min((step - warmup) / span, 1.0)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(round(decay_fraction * total), 1)
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / decay_steps, 1.0)
        return 1.0 - (1 - min_ratio) * progress

    return factor


def make_scheduler(optimizer: Optimizer, factor: Callable[[int], float]) -> LambdaLR:
    return LambdaLR(optimizer, factor)
