"""Stage ``assemble``: build every searched child from the block library and export it.

Each solution in ``solutions/index.json`` becomes ``children/<name>/``: a checkpoint in
the DeciLM layout that plain transformers loads. ``children/index.json`` lists them with
their blocks, parameter count and the cost model's predicted speedup.
"""

from __future__ import annotations

from pathlib import Path

from puzzle_core import layout
from puzzle_core.blocks import BlockSpec
from puzzle_core.interfaces import parameter_count
from puzzle_core.layout import ChildRecord
from puzzle_core.library import layer_key
from puzzle_core.rundir import RunDir, atomic_dir
from puzzle_core.search import Solution


def read_solutions(run_dir: RunDir) -> list[tuple[str, Solution]]:
    """``(name, solution)`` for every solution the search stage listed."""
    index = layout.read_solutions_index(run_dir, required=True)
    return [(entry.name, layout.read_solution(run_dir, entry)) for entry in index.solutions]


def predicted_speedup(run_dir: RunDir, blocks: list[str]) -> float | None:
    """Parent runtime / child runtime under the cost model (fixed costs included)."""
    costs = layout.read_costs(run_dir)
    if costs is None:
        return None
    parents = layout.read_library_index(run_dir, required=True).parent_blocks()
    fixed = costs.fixed.get("runtime_ms", 0.0)

    def total(chosen: list[str]) -> float:
        return fixed + sum(costs.layers[layer_key(i)][b]["runtime_ms"] for i, b in enumerate(chosen))

    child = total(blocks)
    return total(parents) / child if child > 0 else None


def chosen_blocks(solution: Solution, num_layers: int) -> list[str]:
    return [solution.chosen[layer_key(i)] for i in range(num_layers)]


def run(ctx) -> list[Path]:
    from puzzle_core.bld import load_sublayers

    run_dir: RunDir = ctx.run_dir
    records = []
    for name, solution in read_solutions(run_dir):
        block_ids = chosen_blocks(solution, ctx.parent.shape.num_layers)
        blocks = [BlockSpec.parse(b) for b in block_ids]
        child = ctx.family.build_child(ctx.parent, blocks, load_sublayers(run_dir, blocks))
        target = layout.child_dir(run_dir, name)
        with atomic_dir(target) as tmp:
            ctx.family.export(child, tmp)
        records.append(
            ChildRecord(
                name=name,
                solver=solution.solver,
                blocks=block_ids,
                path=layout.relative(run_dir, target),
                params=parameter_count(child.model),
                predicted_speedup=predicted_speedup(run_dir, block_ids),
            )
        )
    index_path = layout.write_children(run_dir, records)
    return [index_path] + [p for r in records for p in sorted(run_dir.path(r.path).rglob("*")) if p.is_file()]
