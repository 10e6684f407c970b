"""Frontier sweeps: the best objective each solver reaches at a series of runtime budgets.

For every speedup ``s`` the runtime budget is parent runtime / ``s`` (on top of the
problem's other constraints). The plot shows the objective against predicted throughput
(or predicted speedup when the library has no scenario) with the parent marked, in the
style of the Puzzle paper's accuracy-vs-throughput figures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs
from tqdm import tqdm

from puzzle_core.config import CONVERTER
from puzzle_core.errors import UserError
from puzzle_core.rundir import atomic_path
from puzzle_core.search import RUNTIME, SearchProblem, run_solver, throughput


@attrs.frozen
class FrontierPoint:
    """One solver at one budget; ``objective_value`` is ``None`` when it found no choice."""

    solver: str
    target_speedup: float
    objective_value: float | None = None
    runtime_ms: float | None = None  # predicted, whole model
    speedup: float | None = None  # predicted: parent runtime / runtime
    throughput: float | None = None  # predicted tokens/s (needs a scenario)
    chosen: dict[str, str] | None = None
    note: str = ""  # why no choice was found


@attrs.frozen
class Frontier:
    """A sweep: the parent's point and each solver's points, by increasing target speedup."""

    objective: str
    minimize: bool
    parent: FrontierPoint
    points: list[FrontierPoint]

    def to_json(self) -> dict:
        return CONVERTER.unstructure(self)


def _point(problem: SearchProblem, solver: str, target: float, names: Sequence[str], scenario, value: float):
    runtime = problem.total(RUNTIME, names)
    return FrontierPoint(
        solver=solver,
        target_speedup=target,
        objective_value=value,
        runtime_ms=runtime,
        speedup=problem.parent_runtime() / runtime if runtime > 0 else None,
        throughput=throughput(runtime, scenario) if scenario is not None else None,
        chosen=dict(zip(problem.layer_names, names)),
    )


def sweep(
    problem: SearchProblem,
    solvers: Mapping[str, Any],
    speedups: Sequence[float],
    scenario: Mapping[str, Any] | None = None,
) -> Frontier:
    """Solve ``problem`` at each speedup with each of ``solvers`` (name -> Solver)."""
    single = attrs.evolve(problem, num_solutions=1)
    parent = _point(single, "parent", 1.0, single.parent, scenario, single.objective_value(single.parent))
    points = []
    jobs = [(s, name) for s in sorted(speedups) for name in solvers]
    for target, name in tqdm(jobs, desc="frontier", unit="solve", file=sys.stderr, disable=len(jobs) < 2):
        try:
            (best, *_) = run_solver(solvers[name], single.at_speedup(target), name)
        except UserError as exc:  # infeasible at this budget, or the solver gave up
            points.append(FrontierPoint(solver=name, target_speedup=target, note=str(exc)))
            continue
        names = [best.chosen[layer] for layer in single.layer_names]
        points.append(_point(single, name, target, names, scenario, best.objective_value))
    return Frontier(objective=str(problem.objective), minimize=problem.minimize, parent=parent, points=points)


def plot_frontier(frontier: Frontier, path: str | Path) -> Path:
    """A PNG of objective vs predicted throughput (or speedup), one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_throughput = frontier.parent.throughput is not None
    x_of = (lambda p: p.throughput) if use_throughput else (lambda p: p.speedup)
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    solvers = list(dict.fromkeys(p.solver for p in frontier.points))
    markers = "osD^v<>"
    for index, solver in enumerate(solvers):
        found = [p for p in frontier.points if p.solver == solver and p.objective_value is not None]
        found.sort(key=x_of)
        axes.plot(
            [x_of(p) for p in found],
            [p.objective_value for p in found],
            marker=markers[index % len(markers)],
            label=solver,
        )
    axes.scatter(
        [x_of(frontier.parent)], [frontier.parent.objective_value], marker="*", s=220, color="black", zorder=5,
        label="parent",
    )
    axes.set_xlabel("predicted throughput (tokens/s)" if use_throughput else "predicted speedup over the parent (x)")
    direction = "lower is better" if frontier.minimize else "higher is better"
    axes.set_ylabel(f"{frontier.objective} ({direction})")
    axes.set_title("Search frontier: objective vs predicted speed")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
