"""The statistics every report uses (docs/evaluation.md): Wilson intervals for one arm, paired bootstrap
intervals of differences over the same items, the verdict read from such an interval, and the smallest
paired difference a sample can detect.

Why these: a percentile bootstrap of one proportion collapses to [0, 0] when nothing is correct, while
the Wilson interval stays honest at 0% and 100%; two arms run on the same problems are compared by
resampling problems (pairs), never by checking whether their marginal intervals overlap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Z95 = 1.959963984540054  # two-sided 95%
Z80_POWER = 0.8416212335729143  # one-sided quantile for 80% power

Verdict = Literal["better", "worse", "indistinguishable"]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n <= 0:
        raise ValueError("a Wilson interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n} trials")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always contains p (rounding can put center - half a hair above p = 0)
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], reps: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of (a - b) over the same items and its percentile bootstrap interval, resampling items.

    Returns (difference, low, high)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must have the same length ({x.shape} vs {y.shape})")
    if x.size == 0:
        raise ValueError("no pairs to bootstrap")
    if reps < 1:
        raise ValueError("reps must be positive")
    diff = x - y
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(reps, diff.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def verdict(low: float, high: float) -> Verdict:
    """Read a paired interval of (reference - other): above 0 better, below 0 worse, else indistinguishable."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "indistinguishable"


def min_detectable_difference(n: int, discordance: float | None = None) -> float:
    """Smallest paired accuracy difference detectable at 80% power, two-sided alpha 0.05 (normal approximation
    of the paired test, as McNemar's). `discordance` = share of items where the two arms disagree; None = the
    worst case (every item discordant). The result is at least (z_a + z_b)^2 / n, the difference reached when
    every discordant item goes one way."""
    if n <= 0:
        raise ValueError("n must be positive")
    z = Z95 + Z80_POWER
    if discordance is None:
        return min(1.0, z / math.sqrt(n))
    return min(1.0, max(z * math.sqrt(max(discordance, 0.0) / n), z * z / n))


@dataclass(frozen=True)
class Comparison:
    reference: str
    other: str
    reference_accuracy: float
    other_accuracy: float
    difference: float  # reference - other
    ci_low: float
    ci_high: float
    verdict: Verdict
    discordant: int  # items where exactly one of the two is correct
    mdd: float  # min detectable difference at the observed discordance
    n: int

    def row(self) -> dict[str, object]:
        return {
            "reference": self.reference, "other": self.other, "ref_acc": self.reference_accuracy,
            "other_acc": self.other_accuracy, "difference": self.difference, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "verdict": self.verdict, "discordant": self.discordant,
            "min_detectable": self.mdd, "n": self.n,
        }  # fmt: skip

    def sentence(self) -> str:
        ci = f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}]"
        if self.verdict == "indistinguishable":
            return (
                f"{self.reference} vs {self.other}: indistinguishable (difference {self.difference:+.3f}, "
                f"95% paired interval {ci} contains 0; {self.discordant}/{self.n} discordant problems; "
                f"this sample detects differences of about {self.mdd:.3f} or more)."
            )
        return (
            f"{self.reference} is {self.verdict} than {self.other} (difference {self.difference:+.3f}, "
            f"95% paired interval {ci})."
        )


def compare(
    reference: str, ref_correct: Sequence[bool], other: str, other_correct: Sequence[bool], reps: int, seed: int
) -> Comparison:
    """Paired comparison of two arms graded on the same items in the same order."""
    a = np.asarray(ref_correct, dtype=np.float64)
    b = np.asarray(other_correct, dtype=np.float64)
    diff, low, high = paired_bootstrap(a.tolist(), b.tolist(), reps, seed)
    discordant = int((a != b).sum())
    return Comparison(
        reference, other, float(a.mean()), float(b.mean()), diff, low, high, verdict(low, high), discordant,
        min_detectable_difference(a.size, discordant / a.size), int(a.size),
    )  # fmt: skip


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (n >= 2): a random order, each item taking the next one's place."""
    if n < 2:
        return list(range(n))
    order = np.random.default_rng(seed).permutation(n)
    out = [0] * n
    for i in range(n):
        out[int(order[i])] = int(order[(i + 1) % n])
    return out


def change_row(arm: str, before: Sequence[bool], after: Sequence[bool], reps: int, seed: int) -> dict[str, Any]:
    """Accuracy before and after on the same problems, with a paired bootstrap interval of the change."""
    change, low, high = paired_bootstrap(after, before, reps, seed)
    old, new = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    return {
        "arm": arm, "before": float(old.mean()), "after": float(new.mean()), "change": change,
        "change_ci_low": low, "change_ci_high": high, "n": len(new),
    }  # fmt: skip
