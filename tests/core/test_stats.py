"""Paired bootstrap intervals against independent computations: scipy, a normal approximation, brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from puzzle_core.stats import PairedScores, accuracy_interval, compare, compare_tasks


def correlated(n: int, parent_rate: float, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 scores of a parent and of a child that changes the parent's answer on a ``flip`` share of items."""
    rng = np.random.default_rng(seed)
    parent = (rng.random(n) < parent_rate).astype(float)
    changed = rng.random(n) < flip
    child = np.where(changed, (rng.random(n) < 0.3).astype(float), parent)
    return parent, child


def test_task_intervals_match_scipy_paired_bootstrap():
    parent, child = correlated(240, 0.55, 0.25, seed=3)
    chance = np.full(240, 0.25)
    ours = compare(PairedScores(parent, child, chance), iterations=40_000)
    statistics = {
        "difference": lambda p, c, axis=-1: c.mean(axis) - p.mean(axis),
        "preserved": lambda p, c, axis=-1: c.mean(axis) / p.mean(axis),
        "chance_adjusted": lambda p, c, axis=-1: (c.mean(axis) - 0.25) / (p.mean(axis) - 0.25),
    }
    for name, statistic in statistics.items():
        theirs = scipy_stats.bootstrap((parent, child), statistic, paired=True, vectorized=True, n_resamples=40_000,
                                       method="percentile", random_state=0).confidence_interval
        mine = getattr(ours, name)
        assert mine.value == pytest.approx(statistic(parent, child))
        assert (mine.low, mine.high) == pytest.approx((theirs.low, theirs.high), abs=0.006), name


def test_difference_interval_matches_the_normal_approximation():
    # 1000 items: the child loses 100 the parent got right and wins 50 it got wrong
    parent = np.array([1.0] * 100 + [0.0] * 50 + [1.0] * 500 + [0.0] * 350)
    child = np.array([0.0] * 100 + [1.0] * 50 + [1.0] * 500 + [0.0] * 350)
    result = compare(PairedScores(parent, child, np.full(1000, 0.25)), iterations=40_000)
    # difference = -0.05; plug-in variance of the per-item difference = 0.15 - 0.05^2
    half_width = 1.959964 * np.sqrt((0.15 - 0.05**2) / 1000)
    assert result.difference.value == pytest.approx(-0.05)
    assert result.difference.low == pytest.approx(-0.05 - half_width, abs=0.002)
    assert result.difference.high == pytest.approx(-0.05 + half_width, abs=0.002)
    assert result.parent.value == pytest.approx(0.6) and result.child.value == pytest.approx(0.55)


def test_identical_answers_give_degenerate_intervals():
    parent, _ = correlated(100, 0.5, 0.0, seed=1)
    result = compare(PairedScores(parent, parent, np.full(100, 0.5)))
    assert (result.difference.low, result.difference.high) == (0.0, 0.0)
    assert (result.preserved.low, result.preserved.value, result.preserved.high) == (1.0, 1.0, 1.0)


def test_mean_over_tasks_matches_brute_force_joint_resampling():
    tasks = {}
    for seed, (n, rate, flip, choices) in enumerate([(150, 0.6, 0.2, 4), (80, 0.7, 0.3, 2), (300, 0.45, 0.15, 5)]):
        parent, child = correlated(n, rate, flip, seed)
        tasks[f"t{seed}"] = PairedScores(parent, child, np.full(n, 1 / choices))
    _, mean = compare_tasks(tasks, iterations=20_000)

    rng = np.random.default_rng(123)  # draw item indices, every task in every replicate
    drawn = {name: rng.integers(0, len(s.parent), (20_000, len(s.parent))) for name, s in tasks.items()}
    p, c, h = ({name: getattr(s, part)[drawn[name]].mean(axis=1) for name, s in tasks.items()}
               for part in ("parent", "child", "chance"))
    preserved = np.mean([c[name] / p[name] for name in tasks], axis=0)
    adjusted = sum(c[n] - h[n] for n in tasks) / sum(p[n] - h[n] for n in tasks)
    for ours, theirs in ((mean.preserved, preserved), (mean.chance_adjusted, adjusted)):
        assert (ours.low, ours.high) == pytest.approx(tuple(np.percentile(theirs, [2.5, 97.5])), abs=0.01)
    points = {name: (s.parent.mean(), s.child.mean(), s.chance.mean()) for name, s in tasks.items()}
    assert mean.preserved.value == pytest.approx(np.mean([c / p for p, c, _ in points.values()]))
    assert mean.chance_adjusted.value == pytest.approx(
        sum(c - h for _, c, h in points.values()) / sum(p - h for p, _, h in points.values()))
    assert mean.items == 530


def test_intervals_the_data_cannot_bound_are_none():
    parent = np.array([1.0] + [0.0] * 9)  # one correct answer in ten: the parent scores 0 in a third of replicates
    result = compare(PairedScores(parent, parent, np.full(10, 0.25)))
    assert result.preserved.value == 1.0 and result.preserved.low is None and result.preserved.high is None
    assert result.chance_adjusted.value is None  # the parent is below chance
    interval = accuracy_interval([1.0, 0.0, 1.0, 1.0])
    assert interval.value == 0.75 and 0.0 <= interval.low < 0.75 < interval.high <= 1.0
    with pytest.raises(ValueError, match="same positive number of items"):
        PairedScores([1.0], [1.0, 0.0], [0.5])


def test_tasks_where_the_parent_is_not_above_chance_do_not_count_in_the_chance_adjusted_mean():
    rng = np.random.default_rng(5)
    good = PairedScores(*correlated(200, 0.7, 0.2, seed=7), np.full(200, 0.25))
    biased = PairedScores((rng.random(200) < 0.35).astype(float), (rng.random(200) < 0.5).astype(float),
                          np.full(200, 0.5))  # a parent below chance (a yes/no task it answers 'no')
    with_biased, alone = compare_tasks({"good": good, "biased": biased})[1], compare_tasks({"good": good})[1]
    assert with_biased.chance_adjusted.value == alone.chance_adjusted.value
    assert (with_biased.chance_adjusted.low, with_biased.chance_adjusted.high) == pytest.approx(
        (alone.chance_adjusted.low, alone.chance_adjusted.high), abs=0.02)  # other draws of the same task
    assert with_biased.preserved.value == pytest.approx((good.child.mean() / good.parent.mean()
                                                         + biased.child.mean() / biased.parent.mean()) / 2)
