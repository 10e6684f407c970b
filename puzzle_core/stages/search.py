"""Stage ``search``: choose the children's blocks from the scored and costed library.

Reads the merged library of the run (``library/index.json`` + scores + costs; the parent
block of a layer is the first one listed), the fixed costs and scenario from
``costs/costs.json``, and the ``search`` config section. Writes to ``solutions/``:

- ``<solver>.json`` per solver (main solver, then each baseline) and ``<solver>_<k>.json``
  for the main solver's extra diverse solutions: :class:`~puzzle_core.search.Solution`
  records whose ``chosen`` maps ``layer_<i>`` to a block id (``puzzle model assemble
  --blocks`` reads them);
- ``index.json``: ``{"objective", "minimize", "constraints", "parent": {"objective_value",
  "totals"}, "solutions": [{"name", "file", "solver", "main", "status", "objective_value"}],
  "frontier": {"json", "png"} | null}``, main solutions first;
- ``frontier.json`` and ``frontier.png`` when ``search.speedups`` lists two or more budgets.

With ``search.fit_memory`` the whole child's ``stats.memory_mib`` (weights + KV cache at
the scenario's batch) is bounded by the device memory the cost stage recorded; with
``search.largest_batch: <cost model>`` the parent's and every solution's entry in
``index.json`` get ``largest_batch``: the largest batch that fits that cost model's GPU,
with its throughput and memory there (priced from the parent's config, no weights read).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import attrs

from puzzle_core import layout
from puzzle_core.errors import UserError
from puzzle_core.frontier import plot_frontier, sweep
from puzzle_core.layout import FrontierFiles, LargestBatch, SearchParent, SolutionEntry, SolutionsIndex
from puzzle_core.library import BlockLibrary
from puzzle_core.library_view import build_library_view
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.search import Constraint, SearchProblem, SearchWarning, build_problem, run_solver
from puzzle_core.schema import SearchSection

def run_library(run_dir: RunDir) -> tuple[BlockLibrary, dict[str, float], dict[str, Any] | None]:
    """The run's merged library, its fixed costs and its scenario (``None`` before the cost stage)."""
    if layout.read_library_index(run_dir) is None:
        raise UserError(
            f"{run_dir.root} has no block library yet ({layout.LIBRARY_INDEX}). Run the library, score and cost "
            f"stages first: `puzzle run CONFIG --run-dir {run_dir.root}`."
        )
    library = build_library_view(run_dir)
    costs = layout.read_costs(run_dir)
    return library, dict(costs.fixed) if costs else {}, costs.scenario if costs else None


def section_problem(
    library: BlockLibrary, section: SearchSection, fixed: dict[str, float], scenario: dict | None, speedup: bool = True
) -> SearchProblem:
    """The problem a config section describes (without its ``speedup`` when ``speedup=False``)."""
    return build_problem(
        library,
        section.objective,
        minimize=section.minimize,
        constraints=section.constraints,
        speedup=section.speedup if speedup else None,
        layer_rules=section.layers,
        fixed=fixed,
        scenario=scenario,
        num_solutions=section.num_solutions,
        min_diversity=section.min_diversity,
    )


def memory_bound(run_dir: RunDir) -> Constraint:
    """``stats.memory_mib <= `` the device memory the cost stage recorded."""
    costs = layout.read_costs(run_dir)
    capacity = costs.memory_check.capacity_mib if costs and costs.memory_check else None
    if capacity is None:
        raise UserError(
            "search.fit_memory bounds the child's memory by the device's, but the cost model of this run does not "
            "know the device's memory (costs/costs.json has no memory_check). Use a cost model of a GPU (h100), or "
            "set search.fit_memory: false and bound stats.memory_mib in search.constraints yourself."
        )
    return Constraint.parse(f"stats.memory_mib<={capacity}")


def batch_fitter(ctx, num_layers: int):
    """``fit(chosen)``: the largest batch that fits ``search.largest_batch``'s GPU (``chosen=None``: the parent)."""
    from puzzle_core.blocks import BlockSpec
    from puzzle_core.costing import largest_batch
    from puzzle_core.library import layer_key

    choice = ctx.config.search.largest_batch
    model = ctx.registries.record(choice).create(choice.options)
    family, shape = ctx.parent_architecture
    scenario = ctx.config.scenario

    def fit(chosen: dict[str, str] | None) -> LargestBatch:
        blocks = None if chosen is None else [BlockSpec.parse(chosen[layer_key(i)]) for i in range(num_layers)]
        best = largest_batch(model, shape, scenario, family, blocks)
        if best is None:
            return LargestBatch(choice.name, 0)
        total = best.summary()
        return LargestBatch(choice.name, best.scenario.batch_size,
                            **{k: total[k] for k in ("tokens_per_s", "tokens_per_s_per_gpu", "memory_mib", "runtime_ms")})

    return fit


def solution_name(solver: str, rank: int) -> str:
    """``mip`` for the best solution, ``mip_1``, ``mip_2``... for the diverse runners-up."""
    return solver if rank == 0 else f"{solver}_{rank}"


def run(ctx) -> list[Path]:
    section: SearchSection = ctx.config.search
    run_dir: RunDir = ctx.run_dir
    names = [section.solver.name] + [b.name for b in section.baselines]
    if len(set(names)) != len(names):
        raise UserError(
            f"search.solver and search.baselines name a solver twice ({', '.join(names)}); list each solver once."
        )
    library, fixed, scenario = run_library(run_dir)
    if section.fit_memory:
        section = attrs.evolve(section, constraints=[*section.constraints, memory_bound(run_dir)])
    problem = section_problem(library, section, fixed, scenario)
    out = run_dir.path(layout.SOLUTIONS)
    written: list[Path] = []
    entries: list[SolutionEntry] = []
    fitted = batch_fitter(ctx, library.num_layers) if section.largest_batch is not None else None
    solvers = {
        choice.name: ctx.registries.record(choice).create(choice.options) for choice in [section.solver, *section.baselines]
    }
    for name, solver in solvers.items():
        main = name == section.solver.name
        try:
            solutions = run_solver(solver, problem if main else attrs.evolve(problem, num_solutions=1), name)
        except UserError as exc:
            if main:
                raise
            warnings.warn(f"Baseline {name} found no solution: {exc}", SearchWarning, stacklevel=2)
            continue
        for rank, solution in enumerate(solutions):
            path = layout.write_solution(run_dir, solution_name(name, rank), solution)
            written.append(path)
            entries.append(
                SolutionEntry(
                    name=solution_name(name, rank),
                    file=path.name,
                    solver=name,
                    main=main,
                    status=solution.status,
                    objective_value=solution.objective_value,
                    largest_batch=fitted(solution.chosen) if fitted else None,
                )
            )
            fit = entries[-1].largest_batch
            print(
                f"    {solution_name(name, rank)}: {problem.objective} = {solution.objective_value:.6g} "
                f"({solution.status}, {solution.solve_seconds:.2f}s)"
                + (f"; largest batch on {fit.cost_model}: {fit.batch_size}"
                   + (f", {fit.tokens_per_s:,.0f} tokens/s" if fit.batch_size else "") if fit else "")
            )

    frontier_files = None
    if len(section.speedups) >= 2:
        base = section_problem(library, section, fixed, scenario, speedup=False)
        frontier = sweep(base, solvers, section.speedups, scenario)
        json_path, png_path = layout.frontier_paths(run_dir)
        atomic_write_json(json_path, frontier.to_json())
        plot_frontier(frontier, png_path)
        written += [json_path, png_path]
        frontier_files = FrontierFiles(json=json_path.name, png=png_path.name)

    index_path = layout.write_solutions_index(
        run_dir,
        SolutionsIndex(
            objective=str(problem.objective),
            minimize=problem.minimize,
            constraints=[str(c) for c in problem.constraints],
            parent=SearchParent(problem.objective_value(problem.parent), problem.totals(problem.parent),
                                fitted(None) if fitted else None),
            solutions=entries,
            frontier=frontier_files,
        ),
    )
    written.append(index_path)
    for stale in out.iterdir():  # results of an earlier search with other settings
        if stale.is_file() and stale.suffix in {".json", ".png"} and stale not in written:
            stale.unlink()
    return written
