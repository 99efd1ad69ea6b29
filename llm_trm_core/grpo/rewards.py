"""Reward functions with TRL's signature: `reward(completions, **kwargs) -> list[float | None]`.

`completions` are the decoded answers; dataset columns arrive as keyword lists aligned with them
(here `answer_value`, the gold number). Grading is the shared answer module's (docs/architecture.md), so rewards,
datagen accuracy and evaluation agree on what counts as correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llm_trm_core.data.answers import extract_strict, grade

RewardFunction = Callable[..., list[float | None]]  # (completions, **columns) -> one float (or None) each


def correctness_reward(completions: Sequence[str], answer_value: Sequence[float], **_: Any) -> list[float | None]:
    """1.0 when the extracted answer equals the gold number (numeric comparison), else 0.0."""
    return [float(grade(text, gold).numeric) for text, gold in zip(completions, answer_value, strict=True)]


def format_reward(completions: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 for a strict `#### N` answer line (whatever the number), else 0.0."""
    return [float(extract_strict(text) is not None) for text in completions]


def combined_rewards(
    functions: Sequence[tuple[RewardFunction, float]], completions: Sequence[str], **columns: Any
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Weighted sum of several reward functions, as TRL: a `None` (not applicable) is left out of the sum
    rather than scored 0, and a completion no function applies to gets NaN, which the learner excludes from
    the group statistics and the loss. Returns the total per completion and each function's raw values."""
    total = [0.0] * len(completions)
    applied = [False] * len(completions)
    parts: dict[str, list[float | None]] = {}
    for function, weight in functions:
        values = [None if v is None else float(v) for v in function(completions, **columns)]
        if len(values) != len(completions):
            raise ValueError(f"reward {reward_name(function)} returned {len(values)} values for {len(completions)}")
        parts[reward_name(function)] = values
        for i, v in enumerate(values):
            if v is not None:
                total[i] += weight * v
                applied[i] = True
    return [t if ok else float("nan") for t, ok in zip(total, applied, strict=True)], parts


def reward_name(function: RewardFunction) -> str:
    return str(getattr(function, "__name__", type(function).__name__))
