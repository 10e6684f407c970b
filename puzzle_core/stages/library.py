"""Stage ``library``: capture the parent's activations, then train every block variant (BLD).

Both steps are job lists run by the configured executor (``library.executor``), so they
spread over torchrun processes (or a cluster plugin) the same way: one capture job per
shard, one BLD job per pass over a layer's activations (its units trained side by side). Writes
``library/blocks/`` (weights and per-job records), ``library/index.json`` (blocks per
layer, parent first, with every trained unit's record) and the merged
``library/library.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from puzzle_core.activations import ActivationStore, CaptureSettings
from puzzle_core import layout
from puzzle_core.bld import (
    BLDTrainer,
    ParentLayers,
    TrainSettings,
    plan_library,
    resolve_subspace,
    write_index,
)
from puzzle_core.config import unstructure
from puzzle_core.devices import resolve_device
from puzzle_core.errors import UserError
from puzzle_core.library_view import write_library_view
from puzzle_core.parents import resolve_parent


def library_parts(ctx) -> tuple[ActivationStore, TrainSettings, Any]:
    """The run's activation store (planned), BLD settings and loss, as the stage uses them."""
    config, section = ctx.config, ctx.config.library
    capture = CaptureSettings.from_config(config)
    store = ActivationStore(ctx.run_dir, capture, ctx.parent_architecture[1].num_layers)
    store.plan(ctx.corpus)
    if not store.split_shards("train"):
        raise UserError("library.tokens gives no training sequences; raise it to at least one sequence (seq_len).")
    settings = TrainSettings(
        activations=capture.key,
        mode=section.mode,
        loss=unstructure(section.loss),
        lr=section.lr,
        weight_decay=section.weight_decay,
        warmup_fraction=section.warmup_fraction,
        batch_size=section.batch_size,
        calibration_tokens=section.calibration_tokens,
        init_method=ctx.variant_provider.init_method,
        seed=config.seed,
        bf16=section.bf16,
    )
    return store, settings, ctx.registries.record(section.loss).create(section.loss.options)


def run(ctx) -> list[Path]:
    section = ctx.config.library
    family, shape = ctx.parent_architecture
    spaces = [ctx.variant_provider.variants(shape, layer) for layer in range(shape.num_layers)]
    plan = plan_library(section.mode, shape, spaces, resolve_subspace(section, shape.num_layers))
    executor = ctx.registries.record(section.executor).create(section.executor.options)
    driver = ctx.role.is_driver

    store, settings, loss = library_parts(ctx)
    if driver:
        store.write_meta(shape.hidden_size)
    def capture(shard) -> None:
        if store.is_complete(shard):
            return
        parent = ctx.parent  # capturing runs the whole parent: loaded here, on the first shard missing
        store.capture(family.layer_runner(parent.model), shard, section.batch_size,
                      next(parent.model.parameters()).device)

    def capture_missing() -> None:
        for shard in store.shards:
            capture(shard)

    executor.run(store.jobs(), lambda job: capture(job.payload), "capturing activations", context=ctx)
    device = resolve_device(section.device, ctx.role.local_rank, "library.device")
    # Once the activations are captured a BLD job needs one parent layer: a process that did not capture holds
    # that layer alone, never the whole parent (one that did reuses the parent it has).
    parent = ParentLayers(shape, lambda layer: ctx.parent_layers([layer]))
    trainer = BLDTrainer(ctx.run_dir, family, parent, store, settings, loss, device, capture_missing,
                         progress=ctx.role.rank == 0)
    jobs = trainer.jobs(plan, store.settings.seq_len, section.units_per_pass)
    executor.run(jobs, trainer.run, "training blocks (BLD)", context=ctx)
    if not driver:
        return []

    index = write_index(
        ctx.run_dir,
        plan,
        trainer,
        {
            "parent": str(resolve_parent(ctx.config.parent, ctx.registries)[1]),
            "num_layers": shape.num_layers,
            "seq_len": store.settings.seq_len,
            "train_tokens": store.tokens("train"),
            "heldout_tokens": store.tokens("heldout"),
            "loss": settings.loss,
            "activations": settings.activations,
        },
    )
    write_library_view(ctx.run_dir)
    blocks = ctx.run_dir.path(layout.LIBRARY_BLOCKS)
    blocks.mkdir(parents=True, exist_ok=True)  # also when no variant needs training
    _remove_stale_blocks(blocks, {trainer.weights_path(u) for u in plan.units})
    store.remove_others()
    if not section.keep_activations:
        store.remove()
    return [index, blocks]


def _remove_stale_blocks(folder: Path, current: set[Path]) -> None:
    """Delete blocks of units the plan no longer has (an earlier config's variants)."""
    keep = current | {p.with_suffix(".json") for p in current}
    for path in folder.rglob("*"):
        if path.is_file() and path not in keep:
            path.unlink()
