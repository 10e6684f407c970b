"""Stage ``assemble``: build every searched child from the block library and export it.

Each solution in ``solutions/index.json`` becomes ``children/<name>/``: a checkpoint in
the DeciLM layout that plain transformers loads. ``children/index.json`` lists them with
their blocks, parameter count and the cost model's predicted speedup.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from puzzle_core.blocks import BlockSpec
from puzzle_core.config import CONVERTER
from puzzle_core.interfaces import parameter_count
from puzzle_core.library import layer_key
from puzzle_core.library_view import COSTS, INDEX, layer_blocks
from puzzle_core.rundir import RunDir, atomic_dir, atomic_write_json

CHILDREN_INDEX = ("children", "index.json")


@attrs.frozen
class ChildRecord:
    """One assembled child, as listed in ``children/index.json``."""

    name: str
    solver: str
    blocks: list[str]
    path: str
    params: int
    predicted_speedup: float | None


def read_solutions(run_dir: RunDir) -> list[tuple[str, dict]]:
    """``(name, solution)`` for every solution the search stage listed."""
    index = json.loads(run_dir.path("solutions", "index.json").read_text())
    entries = index["solutions"] if isinstance(index, dict) else index
    return [(e["name"], json.loads(run_dir.path("solutions", e["file"]).read_text())) for e in entries]


def predicted_speedup(run_dir: RunDir, blocks: list[str]) -> float | None:
    """Parent runtime / child runtime under the cost model (fixed costs included)."""
    costs_path = run_dir.path(*COSTS)
    if not costs_path.is_file():
        return None
    costs = json.loads(costs_path.read_text())
    parents = [ids[0] for ids in layer_blocks(json.loads(run_dir.path(*INDEX).read_text()))]
    fixed = costs.get("fixed", {}).get("runtime_ms", 0.0)

    def total(chosen: list[str]) -> float:
        return fixed + sum(costs["layers"][layer_key(i)][b]["runtime_ms"] for i, b in enumerate(chosen))

    child = total(blocks)
    return total(parents) / child if child > 0 else None


def chosen_blocks(solution: dict, num_layers: int) -> list[str]:
    chosen = solution["chosen"]
    return [chosen[layer_key(i)] for i in range(num_layers)]


def run(ctx) -> list[Path]:
    from puzzle_core.bld import load_sublayers

    run_dir: RunDir = ctx.run_dir
    records = []
    for name, solution in read_solutions(run_dir):
        block_ids = chosen_blocks(solution, ctx.parent.shape.num_layers)
        blocks = [BlockSpec.parse(b) for b in block_ids]
        child = ctx.family.build_child(ctx.parent, blocks, load_sublayers(run_dir, blocks))
        target = run_dir.path("children", name)
        with atomic_dir(target) as tmp:
            ctx.family.export(child, tmp)
        records.append(
            ChildRecord(
                name=name,
                solver=solution.get("solver", name),
                blocks=block_ids,
                path=str(target.relative_to(run_dir.root)),
                params=parameter_count(child.model),
                predicted_speedup=predicted_speedup(run_dir, block_ids),
            )
        )
    index_path = run_dir.path(*CHILDREN_INDEX)
    atomic_write_json(index_path, {"children": CONVERTER.unstructure(records)})
    return [index_path] + [p for r in records for p in sorted(run_dir.path(r.path).rglob("*")) if p.is_file()]
