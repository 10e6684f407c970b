"""The ``greedy`` solver: the paper's greedy baseline.

Start from the parent (or from each layer's best-scoring variant) and, while some budget
is exceeded, take the single-layer swap that loses the least objective per unit of
budget excess it removes. Excess is measured relative to each bound and summed over the
constraints, so progress on several budgets adds up; every step strictly reduces it, so
the walk ends.
"""

from __future__ import annotations

import time
from typing import Literal

import attrs
import numpy as np

from puzzle_core.api import (
    SearchProblem,
    Solution,
    Solver,
    SolverPlugin,
    UserError,
    can_hold_alone,
    hookimpl,
    infeasible_error,
)


@attrs.frozen
class GreedyOptions:
    """``start``: ``parent`` (the paper's baseline) or ``best_score`` (each layer's best variant)."""

    start: Literal["parent", "best_score"] = "parent"


class _Budgets:
    """The constraints as arrays: per-variant costs, and bounds on the layer sums."""

    def __init__(self, problem: SearchProblem):
        self.costs = np.stack([np.nan_to_num(problem.values(c.path, cost=True)) for c in problem.constraints])
        bounds = [problem.bounds(c) for c in problem.constraints]
        self.low = np.array([-np.inf if lo is None else lo for lo, _ in bounds])
        self.high = np.array([np.inf if hi is None else hi for _, hi in bounds])
        self.scale = np.array([max([abs(b) for b in pair if b is not None] + [1e-12]) for pair in bounds])

    def excess(self, totals: np.ndarray) -> np.ndarray:
        """Summed distance of the totals (constraints first) to their bounds, relative to each bound."""
        shape = (...,) + (None,) * (totals.ndim - 1)
        outside = np.maximum(totals - self.high[shape], 0.0) + np.maximum(self.low[shape] - totals, 0.0)
        relative = outside / self.scale[shape]
        return np.where(relative > 1e-9, relative, 0.0).sum(axis=0)


def greedy_choice(problem: SearchProblem, start: str, solver: str) -> list[int]:
    """Per-layer indices into ``problem.allowed`` meeting every budget."""
    mask = problem.mask
    worse = np.where(mask, problem.scores() * (1.0 if problem.minimize else -1.0), np.inf)  # higher: worse
    choice = np.argmin(worse, axis=1)
    if start == "parent":
        for i, name in enumerate(problem.parent):
            if name in problem.allowed[i]:
                choice[i] = problem.allowed[i].index(name)
    if not problem.constraints:
        return choice.tolist()
    budgets = _Budgets(problem)
    layers = np.arange(problem.num_layers)
    while True:
        current = budgets.costs[:, layers, choice]  # (constraints, layers)
        totals = current.sum(axis=1)
        excess = budgets.excess(totals)
        if excess == 0:
            return choice.tolist()
        swapped = totals[:, None, None] + budgets.costs - current[:, :, None]  # totals after each swap
        saved = excess - budgets.excess(swapped)  # (layers, variants)
        valid = mask & (saved > 1e-10)  # well above rounding; also rules out keeping the same variant
        if not valid.any():
            break
        loss = worse - worse[layers, choice][:, None]
        ratio = np.where(valid, loss / np.where(valid, saved, 1.0), np.inf)
        layer, variant = np.unravel_index(np.argmin(ratio), ratio.shape)
        choice[layer] = variant
    if not all(can_hold_alone(problem, c) for c in problem.constraints):
        raise infeasible_error(problem, solver)
    raise UserError(
        f"{solver} got stuck: no single-layer swap brings the totals closer to the budgets, though some choice may "
        f"meet them. Use the mip solver, which considers every combination."
    )


class GreedySolver(Solver):
    """Fast, no optimality proof; the baseline the MIP is compared against."""

    name = "greedy"

    def __init__(self, options: GreedyOptions):
        self.options = options

    def solve(self, problem: SearchProblem) -> list[Solution]:
        started = time.perf_counter()
        choice = greedy_choice(problem, self.options.start, self.name)
        return [problem.solution(self.name, choice, "feasible", None, time.perf_counter() - started)]


@hookimpl
def puzzle_solvers() -> list[SolverPlugin]:
    return [
        SolverPlugin(
            name=GreedySolver.name,
            implementation=GreedySolver,
            options=GreedyOptions,
            description="Greedy baseline: cheapest swaps in objective per unit of budget saved",
        )
    ]
