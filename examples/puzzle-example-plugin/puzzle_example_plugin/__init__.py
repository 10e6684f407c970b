"""An example third-party puzzle plugin.

Installed next to puzzle, it is found through the ``puzzle`` entry-point group (see this
package's ``pyproject.toml``) like the built-in plugins, and adds what each section
below registers.
"""

from __future__ import annotations

import time

import attrs
import numpy as np

from puzzle_core.api import (
    CostModelPlugin,
    GPUSpec,
    ModelOutputs,
    Scorer,
    ScorerPlugin,
    ScoringBatch,
    SearchProblem,
    Solution,
    Solver,
    SolverPlugin,
    UserError,
    check_diversity_count,
    hookimpl,
    infeasible_error,
    roofline_cost_model,
)

# ---------------------------------------------------------------- an A100 cost model
# A new GPU for the roofline cost models is its spec sheet and one record.

A100_SXM = GPUSpec(
    name="NVIDIA A100 SXM 80GB",
    memory_gib=80,
    bandwidth_gbs=2039,
    peak_tflops={"fp32": 19.5, "bf16": 312.0},  # no FP8 tensor cores: fp8 scenarios are refused
    source="NVIDIA A100 Tensor Core GPU datasheet (dense)",
)


@hookimpl
def puzzle_cost_models() -> list[CostModelPlugin]:
    return [roofline_cost_model("a100", A100_SXM)]


# ---------------------------------------------------------------- a brute-force solver
# A new solver is a class with ``solve(problem) -> [Solution]``, an options class and a
# record. This one tries every combination, so it only suits small libraries; it is
# the reference the MIP is checked against.


@attrs.frozen
class BruteForceOptions:
    """``max_combinations``: refuse libraries with more combinations than this."""

    max_combinations: int = 2_000_000


class BruteForceSolver(Solver):
    """Exhaustive search: exact optimum and exact diverse runners-up."""

    name = "brute_force"

    def __init__(self, options: BruteForceOptions):
        self.options = options

    def _grid(self, problem: SearchProblem, table: np.ndarray) -> np.ndarray:
        """The sum over layers of ``table`` for every combination, flattened."""
        sizes = [len(names) for names in problem.allowed]
        total = np.zeros(sizes)
        for i, size in enumerate(sizes):
            shape = [1] * len(sizes)
            shape[i] = size
            total = total + table[i, :size].reshape(shape)
        return total.ravel()

    def solve(self, problem: SearchProblem) -> list[Solution]:
        started = time.perf_counter()
        sizes = [len(names) for names in problem.allowed]
        count = int(np.prod(sizes, dtype=float))
        if count > self.options.max_combinations:
            raise UserError(
                f"{self.name} would try {count} combinations, more than max_combinations="
                f"{self.options.max_combinations}. Use the mip solver for libraries this large."
            )
        feasible = np.ones(count, dtype=bool)
        for constraint in problem.constraints:
            totals = problem.fixed.get(constraint.path, 0.0) + self._grid(problem, problem.values(constraint.path, True))
            feasible &= constraint.holds(totals)
        if not feasible.any():
            raise infeasible_error(problem, self.name)
        scores = self._grid(problem, problem.scores())
        candidates = np.flatnonzero(feasible)
        candidates = candidates[np.argsort(scores[candidates] * (1 if problem.minimize else -1), kind="stable")]
        layouts = np.stack(np.unravel_index(candidates, sizes), axis=1)  # (candidates, layers)
        picked: list[np.ndarray] = []
        while len(picked) < problem.num_solutions and len(layouts):
            picked.append(layouts[0])
            layouts = layouts[(layouts != layouts[0]).sum(axis=1) >= problem.min_diversity]
        check_diversity_count(problem, len(picked), self.name)
        seconds = time.perf_counter() - started
        return [problem.solution(self.name, choice.tolist(), "optimal", 0.0, seconds) for choice in picked]


@hookimpl(specname="puzzle_solvers")
def brute_force_solver() -> list[SolverPlugin]:
    return [
        SolverPlugin(
            name=BruteForceSolver.name,
            implementation=BruteForceSolver,
            options=BruteForceOptions,
            description="Exhaustive search over every combination (small libraries; a reference for tests)",
        )
    ]


# ---------------------------------------------------------------- a replace-1-block scorer
# A new scorer is one method: given the model with one block replaced and the parent on
# a batch of validation tokens, return (sum of per-token values, number of tokens). The
# engine caches the parent, runs only the layers after the block, and averages.


class TopOneMismatch(Scorer):
    """Share of tokens whose most likely next token differs from the parent's."""

    needs_parent_log_probs = True

    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        differs = child.log_probs.argmax(-1) != parent.log_probs.argmax(-1)
        return float(differs[batch.mask].sum()), float(batch.mask.sum())


@hookimpl(specname="puzzle_scorers")
def top1_mismatch_scorer() -> list[ScorerPlugin]:
    return [ScorerPlugin(name="top1_mismatch", implementation=TopOneMismatch,
                         description="share of validation tokens whose top-1 prediction changes, block replaced alone")]
