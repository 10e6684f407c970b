"""``puzzle search``: choose one block per layer of a block library, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from puzzle_core.library import BlockLibrary


def _load(library_path: str):
    """A library file (no fixed costs, no scenario) or a run directory (both, from its cost stage)."""
    from puzzle_core.rundir import RunDir
    from puzzle_core.stages.search import run_library

    path = Path(library_path)
    if path.is_dir():
        return run_library(RunDir(path))
    return BlockLibrary.read(path), {}, None


def _solver_choice(name: str, gap: float | None, time_limit: float | None):
    from puzzle_core.choices import SolverChoice
    from puzzle_core.config import structure
    from puzzle_core.registry import get_registries

    get_registries().solvers.entry(name)  # an unknown name lists the solvers and suggests the closest
    options = {key: value for key, value in {"gap": gap, "time_limit": time_limit}.items() if value is not None}
    return structure({"name": name, **options}, SolverChoice, source=f"options of solver '{name}'")


def _table(problem, solutions) -> str:
    """Per-layer choices (one column per solution), then totals against the budgets."""
    single = len(solutions) == 1
    headers = ["layer", "parent"] + [s.solver if single else f"#{k}" for k, s in enumerate(solutions)]
    rows = [
        [layer, parent] + [s.chosen[layer] for s in solutions]
        for layer, parent in zip(problem.layer_names, problem.parent)
    ]
    lines = [_format_rows([headers] + rows)]
    budgets = {c.path: c.text() for c in problem.constraints}
    summary = [["", "parent"] + headers[2:]]
    summary.append(["objective " + str(problem.objective), f"{problem.objective_value(problem.parent):.6g}"]
                   + [f"{s.objective_value:.6g}" for s in solutions])
    parent_totals = problem.totals(problem.parent)
    for path in (p for p in solutions[0].totals if p != str(problem.objective)):
        label = path + (f"  [{budgets[path]}]" if path in budgets else "")
        summary.append([label, f"{parent_totals.get(path, float('nan')):.6g}"]
                       + [f"{s.totals[path]:.6g}" for s in solutions])
    summary.append(["status", ""] + [s.status for s in solutions])
    summary.append(["gap", ""] + ["-" if s.gap is None else f"{s.gap:.2e}" for s in solutions])
    summary.append(["solve seconds", ""] + [f"{s.solve_seconds:.3f}" for s in solutions])
    lines += ["", _format_rows(summary)]
    return "\n".join(lines)


def _format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _write_solutions(out: str, solutions) -> list[Path]:
    """``FILE`` for the best solution, ``FILE_1``, ``FILE_2``... for the runners-up."""
    from puzzle_core.rundir import atomic_write_json

    target = Path(out)
    paths = []
    for rank, solution in enumerate(solutions):
        path = target if rank == 0 else target.with_name(f"{target.stem}_{rank}{target.suffix}")
        atomic_write_json(path, solution.to_json())
        paths.append(path)
    return paths


@click.command("search")
@click.argument("library_path", metavar="LIBRARY")
@click.option("--objective", default="metrics.kl", show_default=True,
              help="Dot-path to optimise, or a weighted sum: 'metrics.kl + 0.5*metrics.lm_loss'.")
@click.option("--minimize/--maximize", default=True, show_default=True, help="Direction of the objective.")
@click.option("--constraint", "constraints", multiple=True, metavar="EXPR",
              help="Repeatable: 'stats.memory_mib<=80000', '10<=stats.runtime_ms<=50', "
                   "'throughput>=6000 tokens/s' (run directories), 'speedup>=1.5'.")
@click.option("--speedup", type=float, default=None, help="Runtime budget = parent runtime / SPEEDUP.")
@click.option("--solver", default="mip", show_default=True, help="mip, greedy, max_params, or a plugin's solver.")
@click.option("--num-solutions", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many diverse solutions (the mip solver; others return one).")
@click.option("--min-diversity", type=click.IntRange(min=1), default=1, show_default=True,
              help="Each further solution differs from every earlier one in at least this many layers.")
@click.option("--gap", type=float, default=None, help="Relative optimality gap (mip, max_params; default 1e-3).")
@click.option("--time-limit", type=float, default=None, help="Seconds per solution (mip, max_params; default 60).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {solver, status, gap, objective_value, chosen, totals, solve_seconds} (a list for several).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the solution JSON here (runners-up to FILE_1, FILE_2...).")
def search_command(
    library_path: str,
    objective: str,
    minimize: bool,
    constraints: tuple[str, ...],
    speedup: float | None,
    solver: str,
    num_solutions: int,
    min_diversity: int,
    gap: float | None,
    time_limit: float | None,
    as_json: bool,
    out: str | None,
) -> None:
    """Choose one variant per layer of LIBRARY (a block-library JSON file or a run directory).

    Constraints bound whole-model totals: a library file has no fixed costs, so they bound
    the sum over its layers; a run directory adds the fixed costs (embedding, LM head) of
    its cost stage and provides the scenario that throughput targets need.
    """
    from puzzle_core.search import build_problem, run_solver

    library, fixed, scenario = _load(library_path)
    problem = build_problem(
        library,
        objective,
        minimize=minimize,
        constraints=constraints,
        speedup=speedup,
        fixed=fixed,
        scenario=scenario,
        num_solutions=num_solutions,
        min_diversity=min_diversity,
    )
    choice = _solver_choice(solver, gap, time_limit)
    from puzzle_core.registry import get_registries

    solutions = run_solver(get_registries().record(choice).create(choice.options), problem, choice.name)
    if out:
        for path in _write_solutions(out, solutions):
            click.echo(f"wrote {path}", err=True)
    if as_json:
        records = [s.to_json() for s in solutions]
        click.echo(json.dumps(records if num_solutions > 1 else records[0], indent=2))
    else:
        click.echo(_table(problem, solutions))


commands = [search_command]
