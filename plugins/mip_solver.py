"""The ``mip`` solver: Puzzle's mixed-integer program, solved with python-mip's CBC; and ``max_params``.

Binary ``x[i, j]`` (layer ``i`` uses variant ``j``), ``sum_j x[i, j] = 1`` per layer,
one or two linear rows per constraint (``min <= sum cost x <= max``, fixed costs already
subtracted), and the summed objective. Diverse solutions come from no-good cuts: after a
solution ``c``, ``sum_i x[i, c_i] <= layers - k`` makes every later one differ from it in
at least ``k`` layers. For a single solution, variants dominated within their layer are
dropped first (an exact reduction that halves typical programs).

``max_params`` is the paper's weak baseline: the same program with ``stats.num_params``
maximised instead of the objective. It reports each choice under the problem's own
objective, so it compares directly with the other solvers; its ``gap`` is the proven gap
on the parameter count.
"""

from __future__ import annotations

import time
import warnings

import attrs
import mip
import numpy as np

from puzzle_core.api import (
    Objective,
    SearchProblem,
    SearchWarning,
    Solution,
    SolutionStatus,
    Solver,
    SolverPlugin,
    UserError,
    check_diversity_count,
    hookimpl,
    infeasible_error,
    torch_threads,
)

OBJECTIVE_SCALE = 1e6
NUM_PARAMS = "stats.num_params"


@attrs.frozen
class MipOptions:
    """CBC settings. ``gap`` is the relative optimality gap at which CBC stops."""

    gap: float = attrs.field(default=1e-3, validator=attrs.validators.ge(0.0))
    time_limit: float = attrs.field(default=60.0, validator=attrs.validators.gt(0.0))  # seconds, per solution
    threads: int = attrs.field(default=1, validator=attrs.validators.ge(1))


@attrs.frozen
class MipResult:
    """One solved program: per-layer indices into ``problem.allowed``, status and proven gap."""

    choice: list[int]
    status: SolutionStatus
    gap: float
    seconds: float


def relative_gap(value: float, bound: float) -> float:
    """``|value - bound| / |value|`` (0 when both agree), the gap CBC stops at."""
    difference = abs(value - bound)
    return 0.0 if difference <= 1e-12 * max(1.0, abs(value)) else difference / max(abs(value), 1e-12)


def undominated(problem: SearchProblem) -> np.ndarray:
    """``problem.mask`` without variants another variant of the same layer dominates.

    ``k`` dominates ``j`` when it is no worse in the objective and in every constraint's
    direction (lower cost under a maximum, higher above a minimum, equal under both),
    and strictly better somewhere or listed first. Swapping ``j`` for ``k`` keeps any
    choice feasible and no worse, so dropping ``j`` cannot lose the optimum; on
    Puzzle-like libraries it removes about half the variables.
    """
    sign = 1.0 if problem.minimize else -1.0
    columns = [sign * problem.scores()]  # lower is better in every column
    for constraint in problem.constraints:
        costs = problem.values(constraint.path, cost=True)
        if constraint.max is not None:
            columns.append(costs)
        if constraint.min is not None:
            columns.append(-costs)
    points = np.nan_to_num(np.stack(columns, axis=-1), nan=np.inf)  # (layers, variants, criteria)
    no_worse = (points[:, :, None, :] <= points[:, None, :, :]).all(axis=-1)  # [i, k, j]: k no worse than j
    better = (points[:, :, None, :] < points[:, None, :, :]).any(axis=-1)
    width = points.shape[1]
    earlier = np.arange(width)[:, None] < np.arange(width)[None, :]
    dominated = (no_worse & (better | earlier) & problem.mask[:, :, None]).any(axis=1)
    return problem.mask & ~dominated


def _linear(variables: list, coefficients: list[float]) -> mip.LinExpr:
    """A linear expression built in one call (much faster than ``xsum`` of products)."""
    return mip.LinExpr(variables=variables, coeffs=coefficients)


def solve_mip(problem: SearchProblem, options: MipOptions, solver: str) -> list[MipResult]:
    """Up to ``problem.num_solutions`` diverse optima of ``problem``, best first.

    Dominated variants are left out when one solution is asked for; runners-up may need
    them, so diverse searches keep every variant.
    """
    model = mip.Model(sense=mip.MINIMIZE if problem.minimize else mip.MAXIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    model.threads = options.threads
    model.max_mip_gap = options.gap
    model.max_mip_gap_abs = 1e-10
    # CBC's preprocessing (its SOS detection on the one-per-layer rows) can return "optimal"
    # choices that break a budget (coin-or/Cbc#452); without it these programs solve as fast.
    model.preprocess = 0
    usable = undominated(problem) if problem.num_solutions == 1 else problem.mask
    indices = [np.flatnonzero(row) for row in usable]  # variant indices with a variable, per layer
    x = [[model.add_var(var_type=mip.BINARY) for _ in row] for row in indices]
    flat = [var for row in x for var in row]
    layer_of = np.repeat(np.arange(problem.num_layers), [len(row) for row in indices])
    variant_of = np.concatenate(indices)
    for row in x:
        model.add_constr(_linear(row, [1.0] * len(row)) == 1)
    for constraint in problem.constraints:
        coefficients = problem.values(constraint.path, cost=True)[layer_of, variant_of].tolist()
        low, high = problem.bounds(constraint)
        if high is not None:
            model.add_constr(_linear(flat, coefficients) <= high)
        if low is not None:
            model.add_constr(_linear(flat, coefficients) >= low)
    scores = problem.scores()[layer_of, variant_of]
    # CBC only accepts improvements of more than ~1e-5 in absolute objective terms; scaling the
    # largest coefficient to 1e6 makes that tolerance negligible whatever the metric's units.
    largest = float(np.abs(scores).max())
    model.objective = _linear(flat, (scores * (OBJECTIVE_SCALE / max(largest, 1e-300))).tolist())

    results: list[MipResult] = []
    status = mip.OptimizationStatus.LOADED
    while len(results) < problem.num_solutions:
        started = time.perf_counter()
        # CBC sets the OpenMP thread count of the whole process, torch's included: without this a
        # search left every later stage of a run (GKD, evaluation) on `options.threads` threads.
        with torch_threads(0):
            status = model.optimize(max_seconds=options.time_limit)
        seconds = time.perf_counter() - started
        if status in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
            choice = [int(row[np.argmax([var.x for var in variables])]) for row, variables in zip(indices, x)]
            gap = relative_gap(model.objective_value, model.objective_bound)
            kind: SolutionStatus = "optimal" if status == mip.OptimizationStatus.OPTIMAL else "time_limit"
            if kind == "time_limit":
                warnings.warn(
                    f"{solver} stopped at its time limit of {options.time_limit:g}s with a proven gap of {gap:.2e} "
                    f"(asked for {options.gap:g}); raise time_limit or gap.",
                    SearchWarning,
                    stacklevel=2,
                )
            results.append(MipResult(choice, kind, gap, seconds))
            chosen = [x[i][int(np.flatnonzero(row == j)[0])] for i, (row, j) in enumerate(zip(indices, choice))]
            model.add_constr(_linear(chosen, [1.0] * len(chosen)) <= problem.num_layers - problem.min_diversity)
            continue
        if results:  # no further diverse solution (or none within the time limit)
            break
        if status == mip.OptimizationStatus.NO_SOLUTION_FOUND:
            raise UserError(
                f"{solver} found no choice meeting the constraints within its time limit of {options.time_limit:g}s. "
                f"Raise time_limit, or loosen the constraints."
            )
        if status in (mip.OptimizationStatus.INFEASIBLE, mip.OptimizationStatus.INT_INFEASIBLE):
            raise infeasible_error(problem, solver)
        raise RuntimeError(f"CBC ended with status {status.name} on a bounded 0/1 program")
    check_diversity_count(problem, len(results), solver, timed_out=status == mip.OptimizationStatus.NO_SOLUTION_FOUND)
    return results


class MipSolver(Solver):
    """Exact search: the optimum within the relative gap, and diverse runners-up."""

    name = "mip"

    def __init__(self, options: MipOptions):
        self.options = options

    def solve(self, problem: SearchProblem) -> list[Solution]:
        return [
            problem.solution(self.name, r.choice, r.status, r.gap, r.seconds)
            for r in solve_mip(problem, self.options, self.name)
        ]


class MaxParamsSolver(Solver):
    """Ignores quality scores: keeps as many parameters as the budgets allow."""

    name = "max_params"

    def __init__(self, options: MipOptions):
        self.options = options

    def solve(self, problem: SearchProblem) -> list[Solution]:
        by_params = problem.with_objective(Objective(((NUM_PARAMS, 1.0),)), minimize=False)
        return [
            problem.solution(self.name, r.choice, r.status, r.gap, r.seconds)
            for r in solve_mip(by_params, self.options, self.name)
        ]


@hookimpl
def puzzle_solvers() -> list[SolverPlugin]:
    return [
        SolverPlugin(
            name=MipSolver.name,
            implementation=MipSolver,
            options=MipOptions,
            description="Mixed-integer program (python-mip / CBC): optimal choice under the budgets",
        ),
        SolverPlugin(
            name=MaxParamsSolver.name,
            implementation=MaxParamsSolver,
            options=MipOptions,
            description="Baseline: maximise the parameter count under the budgets (ignores scores)",
        ),
    ]
