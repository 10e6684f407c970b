"""Paired bootstrap confidence intervals: a child against its parent on the same items.

A child and its parent answer the same items, so their accuracies are compared item by
item: every bootstrap replicate draws the items once (with replacement) and reads both
models' scores on the drawn items. Most of the per-model noise (which items happened to
be drawn) is shared and cancels in the difference, so paired intervals are much tighter
than two independent intervals would suggest.

Per task, from the means over the drawn items of the parent's score ``p``, the child's
``c`` and chance ``h`` (the expected score of a uniform guess, ``1 / #choices``):

- ``difference`` = c - p;
- ``preserved`` = c / p, the paper's "accuracy preserved";
- ``chance_adjusted`` = (c - h) / (p - h): the share of the parent's *above-chance*
  accuracy the child keeps, so a task on which both sit at chance cannot flatter a child.

Over several tasks (a *joint* bootstrap: every replicate redraws each task's items):
``difference`` and ``preserved`` are means over tasks, and ``chance_adjusted`` is
``sum(c - h) / sum(p - h)`` over the tasks on which the parent scores above chance, which
stays finite when one task's parent is near chance (a mean of per-task ratios would
not); a task where the parent is at or below chance has no above-chance accuracy to
keep and does not count in it. Intervals are percentile intervals; an interval
is ``None`` where the ratio is undefined (denominator <= 0) in more replicates than
the interval's tail, i.e. where the data cannot bound it.

Replicates are drawn as multinomial counts over the distinct ``(p, c, h)`` rows of a
task, which is the same distribution as drawing items and costs little for 0/1 scores.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import attrs
import numpy as np

ITERATIONS = 10_000
LEVEL = 0.95


@attrs.frozen
class Interval:
    """A point estimate on the observed items and its percentile bootstrap interval (``None``: unbounded)."""

    value: float | None
    low: float | None
    high: float | None


@attrs.frozen
class Comparison:
    """A child against its parent on the same items: accuracies, difference, preserved, chance-adjusted."""

    items: int
    chance: float
    parent: Interval
    child: Interval
    difference: Interval
    preserved: Interval
    chance_adjusted: Interval


@attrs.frozen(eq=False)
class PairedScores:
    """Per item of one task: the parent's score, the child's, and chance (all in [0, 1])."""

    parent: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=float))
    child: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=float))
    chance: np.ndarray = attrs.field(converter=lambda v: np.asarray(v, dtype=float))

    def __attrs_post_init__(self):
        if not len(self.parent) or not len(self.parent) == len(self.child) == len(self.chance):
            raise ValueError(
                f"paired scores need the same positive number of items, got {len(self.parent)} parent, "
                f"{len(self.child)} child and {len(self.chance)} chance values"
            )

    def means(self) -> np.ndarray:
        """``(p, c, h)`` on the observed items."""
        return np.array([self.parent.mean(), self.child.mean(), self.chance.mean()])

    def resampled_means(self, iterations: int, rng: np.random.Generator) -> np.ndarray:
        """``(iterations, 3)``: ``(p, c, h)`` on bootstrap draws of the items."""
        rows, counts = np.unique(np.stack([self.parent, self.child, self.chance], axis=1), axis=0, return_counts=True)
        n = len(self.parent)
        draws = rng.multinomial(n, counts / n, size=iterations)
        return draws @ rows / n


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _interval(point: float, replicates: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    value = float(point) if np.isfinite(point) else None
    if np.isnan(replicates).mean() > tail:
        return Interval(value, None, None)
    low, high = np.nanpercentile(replicates, [100 * tail, 100 * (1 - tail)])
    return Interval(value, float(low), float(high))


def _statistics(p, c, h) -> dict[str, np.ndarray]:
    return {"parent": p, "child": c, "difference": c - p, "preserved": _ratio(c, p), "chance_adjusted": _ratio(c - h, p - h)}


def _comparison(items: int, point: np.ndarray, replicates: np.ndarray, level: float, chance: float) -> Comparison:
    points = _statistics(*point)
    spread = _statistics(*replicates.T)
    return Comparison(items=items, chance=chance,
                      **{name: _interval(points[name], spread[name], level) for name in points})


def compare(scores: PairedScores, iterations: int = ITERATIONS, level: float = LEVEL, seed: int = 0) -> Comparison:
    """One task: a child against its parent on the same items."""
    rng = np.random.default_rng(seed)
    point = scores.means()
    return _comparison(len(scores.parent), point, scores.resampled_means(iterations, rng), level, float(point[2]))


def compare_tasks(
    tasks: Mapping[str, PairedScores], iterations: int = ITERATIONS, level: float = LEVEL, seed: int = 0
) -> tuple[dict[str, Comparison], Comparison]:
    """Per task and the mean over tasks (see the module doc), from one joint bootstrap."""
    if not tasks:
        raise ValueError("compare_tasks needs at least one task")
    rng = np.random.default_rng(seed)
    names = sorted(tasks)
    points = {name: tasks[name].means() for name in names}
    draws = {name: tasks[name].resampled_means(iterations, rng) for name in names}
    per_task = {
        name: _comparison(len(tasks[name].parent), points[name], draws[name], level, float(points[name][2]))
        for name in names
    }
    mean = _mean_over_tasks(np.stack([points[n] for n in names]), np.stack([draws[n] for n in names], axis=1), level)
    return per_task, attrs.evolve(mean, items=sum(len(tasks[n].parent) for n in names))


def _mean_over_tasks(point: np.ndarray, replicates: np.ndarray, level: float) -> Comparison:
    """``point``: (tasks, 3); ``replicates``: (iterations, tasks, 3) of per-task ``(p, c, h)``."""

    above = point[:, 0] > point[:, 2]  # tasks on which the parent beats chance (on the observed items)

    def statistics(values: np.ndarray) -> dict[str, np.ndarray]:
        p, c, h = values[..., 0], values[..., 1], values[..., 2]
        return {
            "parent": p.mean(-1),
            "child": c.mean(-1),
            "difference": (c - p).mean(-1),
            "preserved": _ratio(c, p).mean(-1),  # NaN when a task's parent scored 0: unbounded
            "chance_adjusted": _ratio((c - h)[..., above].sum(-1), (p - h)[..., above].sum(-1)),
        }

    points, spread = statistics(point), statistics(replicates)
    return Comparison(items=0, chance=float(point[:, 2].mean()),
                      **{name: _interval(points[name], spread[name], level) for name in points})


def accuracy_interval(scores: Sequence[float], iterations: int = ITERATIONS, level: float = LEVEL,
                      seed: int = 0) -> Interval:
    """One model's mean score with its percentile bootstrap interval."""
    same = PairedScores(scores, scores, np.zeros(len(scores)))
    return compare(same, iterations, level, seed).parent
