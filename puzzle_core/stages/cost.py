"""Stage ``cost``: the cost of every offered block for the run's inference scenario.

Reads the block ids per layer from ``library/index.json``, prices each distinct block
once with the configured cost model, and writes ``costs/costs.json``::

    {"cost_model": "h100", "options": {...}, "scenario": {...},
     "fixed": {"runtime_ms": ..., ...},                 # embedding, final norm, LM head
     "layers": {"layer_0": {"attn_g3+ffn_768": {"runtime_ms": ..., ...}, ...}, ...},
     "memory_check": {"capacity_mib": ..., "parent_mib": ..., "parent_fits": ...,
                      "smallest_child_mib": ..., "smallest_child_fits": ...}}

``memory_check`` is there when the cost model knows the device's memory: the parent may
not fit (making it fit can be the point of the search), but when not even the smallest
child the library allows fits, there is nothing to search and the stage stops with a
UserError. The merged ``library/library.json`` view is refreshed afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from puzzle_core.blocks import BlockSpec
from puzzle_core.config import unstructure
from puzzle_core.errors import UserError
from puzzle_core.library import layer_key
from puzzle_core.layout import CostTable, MemoryCheck, read_library_index, write_costs
from puzzle_core.library_view import write_library_view


def _memory_check(capacity_mib: float, fixed: dict, parent_blocks: list[dict], offered: list[list[dict]]) -> MemoryCheck:
    parent = fixed["memory_mib"] + sum(cost["memory_mib"] for cost in parent_blocks)
    smallest = fixed["memory_mib"] + sum(min(cost["memory_mib"] for cost in layer) for layer in offered)
    return MemoryCheck(
        capacity_mib=capacity_mib,
        parent_mib=parent,
        parent_fits=parent <= capacity_mib,
        smallest_child_mib=smallest,
        smallest_child_fits=smallest <= capacity_mib,
    )


def run(ctx) -> list[Path]:
    per_layer = read_library_index(ctx.run_dir, required=True).layer_blocks()
    shape, family, scenario = ctx.parent.shape, ctx.family, ctx.config.scenario
    choice = ctx.config.costs.model
    model = ctx.registries.record(choice).create(choice.options)

    parent_ids = [block.id for block in shape.blocks]
    distinct = list(dict.fromkeys([*parent_ids, *(block_id for layer in per_layer for block_id in layer)]))
    costs: dict[str, dict] = {}
    with tqdm(distinct, desc=f"costing blocks ({choice.name})", unit="block", file=sys.stderr) as bar:
        for block_id in bar:
            bar.set_postfix_str(block_id)
            costs[block_id] = model.block_costs(shape, BlockSpec.parse(block_id), scenario, family)
    fixed = model.fixed_costs(shape, scenario, family)

    capacity = model.memory_capacity_mib(scenario)
    check = None
    if capacity is not None:
        check = _memory_check(
            capacity, fixed, [costs[i] for i in parent_ids], [[costs[b] for b in layer] for layer in per_layer]
        )
        if not check.smallest_child_fits:
            raise UserError(
                f"Even the smallest child the block library allows needs {check.smallest_child_mib:.0f} MiB "
                f"for this scenario (weights + KV cache), more than the {capacity:.0f} MiB that cost model "
                f"'{choice.name}' gives the device. Reduce scenario.batch_size or the sequence lengths, use a "
                f"smaller dtype / kv_dtype, or offer smaller block variants."
            )
        if not check.parent_fits:
            print(
                f"note: the parent needs {check.parent_mib:.0f} MiB for this scenario, more than the "
                f"{capacity:.0f} MiB available; the search should constrain stats.memory_mib to make the child fit.",
                file=sys.stderr,
            )
    table = CostTable(
        cost_model=choice.name,
        options=unstructure(choice.options) if choice.options is not None else {},
        scenario=unstructure(scenario),
        fixed=fixed,
        layers={layer_key(i): {block_id: costs[block_id] for block_id in layer} for i, layer in enumerate(per_layer)},
        memory_check=check,
    )
    path = write_costs(ctx.run_dir, table)
    write_library_view(ctx.run_dir, ctx.role.is_driver)
    return [path]
