"""Stage ``gkd``: global knowledge distillation of the assembled children.

For every child of ``children/index.json`` (or only the first, ``gkd.children: main``)
one job trains it against the parent (:func:`puzzle_core.gkd.distill`) and writes
``gkd/<child>/``: ``final/`` (the uptrained checkpoint, same layout as the assembled
one), ``log.json`` (training loss and validation-KL curves) and ``result.json`` (KL to
the parent before and after). ``gkd/index.json`` lists the results. Checkpoints live in
``gkd/<child>/checkpoints/`` while a child trains, so a killed run resumes mid-child;
they are deleted once its final weights are exported.

Under ``torchrun`` (started by hand, or by the ``torchrun`` executor's ``nproc``) the
processes train each child together instead of sharing children out: one child's
uptraining is the unit of work, and it is the one that needs the speed-up. With
``gkd.sharding: ddp`` every process holds the child and the parent; with ``fsdp`` each
holds 1/N of both (FSDP2), so a parent that does not fit one device can be distilled.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path


from puzzle_core import layout
from puzzle_core.config import stable_hash, unstructure
from puzzle_core.gkd import (
    DistillationObjective,
    DistillRun,
    barrier,
    distill,
    is_main_process,
    join_process_group,
    world,
)
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Job, LoadedModel
from puzzle_core.layout import ChildRecord, GKDResult
from puzzle_core.rundir import RunDir, atomic_dir


class GKDWarning(UserWarning):
    """Uptraining finished but did not bring the child closer to the parent."""


def _outputs(run_dir: RunDir, child: str) -> list[Path]:
    """What the manifest checks for one child: everything but the transient checkpoints."""
    checkpoints = layout.gkd_checkpoints(run_dir, child)
    return [
        p for p in sorted(layout.gkd_dir(run_dir, child).rglob("*")) if p.is_file() and not p.is_relative_to(checkpoints)
    ]


def uptrain_child(ctx, child: ChildRecord) -> None:
    """Train one child and write its folder; skipped when its result matches this config."""
    section = ctx.config.gkd
    run_dir: RunDir = ctx.run_dir
    seq_len = section.seq_len or ctx.config.data.seq_len
    # Checkpoints stay valid while the child and the data layout stay the same, so a run
    # that diverged can resume its last good checkpoint with a lower learning rate.
    fingerprint = stable_hash(
        {
            "upstream": ctx.hashes["assemble"],
            "child": child.name,
            "lora": [section.lora_rank, section.lora_alpha],
            "trainable": [section.trainable, section.trainable_neighbors],
            "layout": [seq_len, section.batch_size, section.grad_accum, world()[1], ctx.config.seed],
            "corpus": unstructure(section.corpus),
        }
    )
    result_fingerprint = stable_hash({"stage": ctx.hashes["gkd"], "child": child.name})
    final = layout.gkd_final(run_dir, child.name)
    checkpoints = layout.gkd_checkpoints(run_dir, child.name)
    done = layout.read_gkd_result(run_dir, child.name)
    if done is not None and done.fingerprint == result_fingerprint and (final / "config.json").is_file():
        if is_main_process():  # a run killed after the result, before the clean-up below, left them
            shutil.rmtree(checkpoints, ignore_errors=True)
        return

    student = ctx.family.load_child(run_dir.path(child.path), dtype=ctx.config.parent.dtype)
    objective = DistillationObjective.from_config(section, ctx.registries)
    run = DistillRun(
        corpus=ctx.tokenized(ctx.config.distillation_corpus),
        seq_len=seq_len,
        seed=ctx.config.seed,
        checkpoint_dir=checkpoints,
        fingerprint=fingerprint,
        label=f"GKD {child.name}",
        local_rank=ctx.role.local_rank,
    )
    model, log, totals = distill(student, ctx.parent, ctx.family, objective, section, run)
    if is_main_process():
        trained = LoadedModel(model=model.cpu().eval(), tokenizer=student.tokenizer, shape=student.shape,
                              source=f"{child.name} after GKD")
        with atomic_dir(final) as tmp:
            ctx.family.export(trained, tmp)
        layout.write_gkd_log(run_dir, child.name, log)
        result = GKDResult(
            child=child.name,
            steps=totals["steps"],
            tokens=totals["tokens"],
            kl_before=log.validation[0].kl,
            kl_after=log.validation[-1].kl,
            lora_rank=section.lora_rank,
            train_seconds=totals["train_seconds"],
            tokens_per_second=totals["tokens"] / max(totals["train_seconds"], 1e-9),
            fingerprint=result_fingerprint,
        )
        layout.write_gkd_result(run_dir, result)
        if result.kl_after > result.kl_before:
            warnings.warn(
                f"GKD raised the validation KL of child '{child.name}' from {result.kl_before:.4g} to "
                f"{result.kl_after:.4g}: the assembled child was closer to the parent. Both are evaluated; for "
                f"a better uptrained one lower gkd.lr (now {section.lr}) or raise gkd.batch_size / gkd.grad_accum.",
                GKDWarning,
                stacklevel=2,
            )
        shutil.rmtree(checkpoints, ignore_errors=True)
    barrier()


def selected_children(ctx) -> list[ChildRecord]:
    section = ctx.config.gkd
    if not section.enabled:
        return []
    children = layout.read_children(ctx.run_dir)
    return children[:1] if section.children == "main" else children


def run(ctx) -> list[Path]:
    run_dir: RunDir = ctx.run_dir
    children = selected_children(ctx)
    if ctx.role.distributed:
        # GKD is data-parallel: every process trains every child together (DDP), in order.
        join_process_group(ctx.role.local_rank)
        for child in children:
            uptrain_child(ctx, child)
    else:
        # In process, or an executor that starts torchrun workers re-running this stage
        # (they take the branch above); afterwards each job is a cheap check here.
        by_name = {child.name: child for child in children}
        jobs = [Job(id=child.name, cost=float(child.params), payload=child.name) for child in children]
        choice = ctx.config.gkd.executor
        executor = ctx.registries.record(choice).create(choice.options)
        executor.run(jobs, lambda job: uptrain_child(ctx, by_name[job.payload]), description="GKD", context=ctx)
    results = [layout.read_gkd_result(run_dir, c.name) for c in children]
    missing = [c.name for c, result in zip(children, results) if result is None]
    if missing:
        raise UserError(f"GKD left no result for child(ren) {', '.join(missing)}; re-run the gkd stage with --resume.")
    index_path = run_dir.path(layout.GKD_INDEX)
    if is_main_process():
        layout.write_gkd_results(run_dir, results)
    barrier()
    return [index_path] + [p for c in children for p in _outputs(run_dir, c.name)]
