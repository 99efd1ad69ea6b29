"""The GRPO stage's loop: `GRPOLearner.step` (llm_trm_core/grpo/learner.py) as the step function of the
shared training loop (llm_trm_core/training/loop.py).

Step i trains on `step_problems(train, i, ...)`, consecutive slices of per-epoch seeded permutations, and
every random draw of the step is seeded by (seed, i): the data position is the step itself, so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes. The greedy held-out check
before training is part of the checkpointed progress: a resumed run does not redo it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_trm_core.data.problems import Problem
from llm_trm_core.grpo.learner import GRPOLearner
from llm_trm_core.latent.artifacts import trained_modules
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.training.loop import Progress, TrainLoop, TrainState

logger = logging.getLogger(__name__)


def step_problems(train: Sequence[Problem], step: int, size: int, seed: int) -> list[Problem]:
    """The questions of optimizer step `step`: consecutive slices of per-epoch seeded permutations."""
    out: list[Problem] = []
    position = step * size
    while len(out) < size:
        epoch, offset = divmod(position, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(train[int(order[offset])])
        position += 1
    return out


@dataclass
class GRPOProgress(Progress):
    before: dict[str, list[bool]] | None = None  # greedy correctness per check arm, before training


@dataclass
class GRPOResult:
    history: list[dict[str, Any]] = field(default_factory=list)  # the learner's metrics, one row per step
    before: dict[str, list[bool]] = field(default_factory=dict)
    resumed_from: int | None = None


def train_grpo(
    learner: GRPOLearner,
    train: Sequence[Problem],
    *,
    before: Callable[[], dict[str, list[bool]]],
    lora: bool = False,
    checkpoints: CheckpointManager | None = None,
    tracker: Tracker | None = None,
) -> GRPOResult:
    """`grpo.steps` learner steps; `before()` runs the held-out check once, before the first step;
    `lora`: LoRA adapters of the policy's LM train (and are checkpointed)."""
    g, policy = learner.cfg, learner.policy
    models = trained_modules(policy, trm=True, lora=lora)
    progress = GRPOProgress()
    loop = TrainLoop(
        "grpo",
        TrainState(models, learner.optimizer, learner.scheduler, progress),
        lr_name="grpo.lr",
        checkpoints=checkpoints,
        checkpoint_every=g.checkpoint_every,
        checkpoint_unit="step",
        max_steps=g.steps,
        tracker=tracker,
    )
    loop.resume()
    if progress.before is None:
        progress.before = before()

    def step(index: int) -> None:
        chosen = step_problems(train, index, g.questions_per_step, learner.seed)
        metrics = learner.step(index, [p.question for p in chosen], {"answer_value": [p.answer_value for p in chosen]})
        progress.history.append(metrics)
        loop.updated(metrics)

    loop.run_steps(step)
    return GRPOResult(history=progress.history, before=progress.before, resumed_from=loop.resumed_from)
