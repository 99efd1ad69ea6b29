"""Hand-checked statistics: Wilson intervals, paired bootstrap, verdict rules, detectable differences."""

from __future__ import annotations

import math

import pytest

from llm_trm_core.stats import (
    compare,
    derangement,
    min_detectable_difference,
    paired_bootstrap,
    verdict,
    wilson_interval,
)


def test_wilson_known_cases() -> None:
    # 0/8: centre = half-width = (z^2/16)/(1+z^2/8) = 0.1622 -> [0, 0.3244] (not the bootstrap's [0, 0])
    low, high = wilson_interval(0, 8)
    assert low == 0.0 and high == pytest.approx(0.3244, abs=1e-4)
    # 4/8: 0.5 +- 1.96*sqrt(0.25/8 + 3.8415/256)/1.4802 = 0.5 +- 0.2848
    low, high = wilson_interval(4, 8)
    assert low == pytest.approx(0.2152, abs=1e-4) and high == pytest.approx(0.7848, abs=1e-4)
    low, high = wilson_interval(8, 8)
    assert high == 1.0 and low == pytest.approx(1 - 0.3244, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_wilson_interval_contains_the_estimate_at_the_edges() -> None:
    """0/n and n/n: rounding put the lower bound a hair above 0 (e.g. 0/6), and evaluate's error bars
    (estimate - low) went negative, which matplotlib refuses; the interval must contain the estimate."""
    for n in range(1, 400):
        for k in (0, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high, (k, n, low, high)


def test_paired_bootstrap_on_constructed_pairs() -> None:
    # identical arms: every resample gives 0
    assert paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], 500) == (0.0, 0.0, 0.0)
    # reference right on 30 of 100 problems where the other is wrong, never the reverse: difference 0.3
    a = [1.0] * 30 + [0.0] * 70
    b = [0.0] * 100
    diff, low, high = paired_bootstrap(a, b, 4000, seed=1)
    se = math.sqrt(0.3 * 0.7 / 100)
    assert diff == pytest.approx(0.3)
    assert low == pytest.approx(0.3 - 1.96 * se, abs=0.02) and high == pytest.approx(0.3 + 1.96 * se, abs=0.02)
    # same marginals (50%) but the pairing matters: a and b swap on every problem -> wide interval around 0
    a = [1.0, 0.0] * 50
    b = [0.0, 1.0] * 50
    diff, low, high = paired_bootstrap(a, b, 2000, seed=2)
    assert diff == 0.0 and low < -0.1 and high > 0.1
    assert paired_bootstrap(a, b, 300, seed=5) == paired_bootstrap(a, b, 300, seed=5)
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1], 100)


def test_verdict_rules() -> None:
    assert verdict(0.01, 0.2) == "better"
    assert verdict(-0.2, -0.01) == "worse"
    assert verdict(-0.1, 0.1) == "indistinguishable"
    assert verdict(0.0, 0.0) == "indistinguishable"  # no discordant problem: no evidence either way
    assert verdict(0.0, 0.3) == "indistinguishable"  # touching 0 is not excluding it
    # marginal intervals that overlap can still be a clear paired difference
    ref = [True] * 12 + [False] * 88
    other = [False] * 100
    c = compare("trm_latent", ref, "no_think", other, 2000, 0)
    assert c.verdict == "better" and c.discordant == 12 and c.difference == pytest.approx(0.12)
    assert "better than no_think" in c.sentence()
    same = compare("trm_latent", ref, "mean_latent", ref, 2000, 0)
    assert same.verdict == "indistinguishable" and "contains 0" in same.sentence()


def test_min_detectable_difference() -> None:
    z = 1.959964 + 0.841621
    assert min_detectable_difference(100) == pytest.approx(z / 10, abs=1e-4)  # worst case: 0.280
    assert min_detectable_difference(100, 0.1) == pytest.approx(z * math.sqrt(0.001), abs=1e-4)  # 0.0886
    assert min_detectable_difference(100, 0.0) == pytest.approx(z * z / 100, abs=1e-4)  # floor: 0.0785
    assert min_detectable_difference(4) == 1.0


def test_derangement_has_no_fixed_point() -> None:
    for n in (2, 3, 7, 50):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(5, 1) == derangement(5, 1) and derangement(1, 0) == [0]
