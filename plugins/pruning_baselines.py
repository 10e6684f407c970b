"""Uniform pruning baselines as solvers: ``layer_drop`` (ShortGPT-style) and ``uniform_width`` (Minitron-style).

Both answer the same :class:`~puzzle_core.search.SearchProblem` as ``mip`` (same budgets,
same library, same objective for reporting), so their children flow through assemble,
GKD and evaluate like any other and compare with Puzzle's at equal cost:

- ``layer_drop`` removes whole layers (the ``attn_noop+ffn_noop`` block) in order of
  least importance, where a layer's importance is its replace-1-block score with that
  block (the problem's objective: how much the model suffers with only that layer
  dropped), until every budget holds; all other layers keep the parent block.
- ``uniform_width`` keeps every attention and gives every layer the same FFN width: the
  widest one offered in every layer that meets the budgets.

Neither searches per layer, which is what Puzzle adds; both need the variants they use
in the library (``include_no_op`` and ``ffn_fractions`` of the variant provider).
"""

from __future__ import annotations

import time

from puzzle_core.api import (
    BlockSpec,
    InfeasibleError,
    NoOptions,
    SearchProblem,
    Solution,
    Solver,
    SolverPlugin,
    UserError,
    hookimpl,
    layer_key,
    readable,
)


def block_spec(problem: SearchProblem, layer: int, name: str) -> BlockSpec | None:
    """The sub-blocks of a variant, from its record's ``attention``/``ffn`` ids or its name (``None``: neither)."""
    record = problem.library.layers[layer][name]
    attention, ffn = record.get("attention"), record.get("ffn")
    text = f"{attention}+{ffn}" if isinstance(attention, str) and isinstance(ffn, str) else name
    try:
        return BlockSpec.parse(text)
    except UserError:
        return None


def parent_choice(problem: SearchProblem, solver: str) -> list[int]:
    """Indices of the parent blocks into ``problem.allowed``; the baselines start from the parent."""
    choice = []
    for layer, (parent, allowed) in enumerate(zip(problem.parent, problem.allowed)):
        if parent not in allowed:
            raise UserError(
                f"{solver} keeps the parent block in the layers it does not prune, but the layer rules forbid it in "
                f"{layer_key(layer)} ({parent}). Drop that rule, or use the mip solver."
            )
        choice.append(allowed.index(parent))
    return choice


def meets_budgets(problem: SearchProblem, choice: list[int]) -> bool:
    return not problem.violations(problem.names(choice))


def budget_text(problem: SearchProblem) -> str:
    return ", ".join(c.text(readable) for c in problem.constraints) or "no budgets"


class LayerDropSolver(Solver):
    """Drop the least important whole layers until the budgets hold (ShortGPT with replace-1-block importance)."""

    name = "layer_drop"

    def __init__(self, options: NoOptions):
        self.options = options

    def solve(self, problem: SearchProblem) -> list[Solution]:
        started = time.perf_counter()
        choice = parent_choice(problem, self.name)
        dropped = {}  # layer -> index of its attn_noop+ffn_noop block
        for layer, names in enumerate(problem.allowed):
            for index, name in enumerate(names):
                spec = block_spec(problem, layer, name)
                if spec is not None and spec.attention.no_op and spec.ffn.no_op:
                    dropped[layer] = index
        if not dropped:
            raise UserError(
                f"{self.name} drops whole layers, but no layer offers the attn_noop+ffn_noop block. Keep no-op "
                f"variants in the library (the variant provider's include_no_op) and allowed by the layer rules."
            )
        worse = problem.scores() * (1.0 if problem.minimize else -1.0)
        importance = {layer: worse[layer, index] - worse[layer, choice[layer]] for layer, index in dropped.items()}
        order = sorted(importance, key=lambda layer: (importance[layer], layer))
        for layer in [None, *order]:
            if layer is not None:
                choice[layer] = dropped[layer]
            if meets_budgets(problem, choice):
                return [problem.solution(self.name, choice, "feasible", None, time.perf_counter() - started)]
        raise InfeasibleError(
            f"{self.name}: dropping all {len(order)} droppable layers in order of importance never meets "
            f"{budget_text(problem)}. Relax the budgets, or use the mip solver."
        )


class UniformWidthSolver(Solver):
    """The same FFN width in every layer, attention kept: the widest that meets the budgets (Minitron-style width)."""

    name = "uniform_width"

    def __init__(self, options: NoOptions):
        self.options = options

    def solve(self, problem: SearchProblem) -> list[Solution]:
        started = time.perf_counter()
        parent = parent_choice(problem, self.name)
        by_fraction: list[dict[float, int]] = []  # per layer: FFN width / parent width -> variant index
        for layer, names in enumerate(problem.allowed):
            parent_spec = block_spec(problem, layer, names[parent[layer]])
            widths = {}
            for index, name in enumerate(names):
                spec = block_spec(problem, layer, name)
                if (
                    spec is not None
                    and parent_spec is not None
                    and spec.attention == parent_spec.attention
                    and spec.ffn.kind == "ffn"
                    and parent_spec.ffn.kind == "ffn"
                ):
                    widths[round(spec.ffn.intermediate_size / parent_spec.ffn.intermediate_size, 3)] = index
            by_fraction.append(widths)
        common = sorted(set.intersection(*(set(w) for w in by_fraction)), reverse=True)
        for fraction in common:
            choice = [widths[fraction] for widths in by_fraction]
            if meets_budgets(problem, choice):
                return [problem.solution(self.name, choice, "feasible", None, time.perf_counter() - started)]
        offered = ", ".join(f"{f:.3g}" for f in common) or "none"
        raise InfeasibleError(
            f"{self.name}: no FFN width offered in every layer (fractions of the parent's: {offered}) meets "
            f"{budget_text(problem)} with the parent's attention kept. Relax the budgets, offer narrower FFNs "
            f"(the variant provider's ffn_fractions), or use the mip solver."
        )


@hookimpl
def puzzle_solvers() -> list[SolverPlugin]:
    return [
        SolverPlugin(
            name=LayerDropSolver.name,
            implementation=LayerDropSolver,
            description="Baseline: drop the least important whole layers until the budgets hold (ShortGPT-style)",
        ),
        SolverPlugin(
            name=UniformWidthSolver.name,
            implementation=UniformWidthSolver,
            description="Baseline: one FFN width for every layer, attention kept (Minitron-style width pruning)",
        ),
    ]
