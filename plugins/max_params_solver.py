"""The ``max_params`` solver: the paper's weak baseline, most parameters within the budgets.

It solves the same program as ``mip`` with ``stats.num_params`` maximised instead of the
objective, then reports each choice under the problem's own objective, so it compares
directly with the other solvers. Its ``gap`` is the proven gap on the parameter count.
"""

from __future__ import annotations

from puzzle_core import hookimpl
from puzzle_core.interfaces import Solver
from puzzle_core.records import SolverPlugin
from puzzle_core.search import Objective, SearchProblem, Solution
from puzzle_plugins.mip_solver import MipOptions, solve_mip

NUM_PARAMS = "stats.num_params"


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
def puzzle_solvers():
    return [
        SolverPlugin(
            name=MaxParamsSolver.name,
            implementation=MaxParamsSolver,
            options=MipOptions,
            description="Baseline: maximise the parameter count under the budgets (ignores scores)",
        )
    ]
