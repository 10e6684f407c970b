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

import json
import shutil
import warnings
from pathlib import Path

from puzzle_core.config import CONVERTER, stable_hash
from puzzle_core.gkd import (
    DistillationObjective,
    DistillRun,
    GKDLog,
    GKDResult,
    barrier,
    distill,
    is_main_process,
    join_process_group,
    world,
)
from puzzle_core.interfaces import Job, LoadedModel
from puzzle_core.rundir import RunDir, atomic_dir, atomic_write_json
from puzzle_core.stages.assemble import CHILDREN_INDEX, ChildRecord

GKD_INDEX = ("gkd", "index.json")


class GKDWarning(UserWarning):
    """Uptraining finished but did not bring the child closer to the parent."""


def read_children(run_dir: RunDir) -> list[ChildRecord]:
    """The assembled children, in the order the assemble stage listed them."""
    data = json.loads(run_dir.path(*CHILDREN_INDEX).read_text())
    return CONVERTER.structure(data["children"], list[ChildRecord])


def child_dir(run_dir: RunDir, name: str) -> Path:
    return run_dir.path("gkd", name)


def read_results(run_dir: RunDir) -> dict[str, GKDResult]:
    """``{child: result}`` for every child listed in ``gkd/index.json`` (empty before the stage)."""
    path = run_dir.path(*GKD_INDEX)
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text())["children"]
    return {e["child"]: CONVERTER.structure(e, GKDResult) for e in entries}


def read_log(run_dir: RunDir, name: str) -> GKDLog | None:
    path = child_dir(run_dir, name) / "log.json"
    return CONVERTER.structure(json.loads(path.read_text()), GKDLog) if path.is_file() else None


def _outputs(directory: Path) -> list[Path]:
    """What the manifest checks for one child: everything but the transient checkpoints."""
    return [
        p for p in sorted(directory.rglob("*")) if p.is_file() and "checkpoints" not in p.relative_to(directory).parts
    ]


def uptrain_child(ctx, child: ChildRecord) -> None:
    """Train one child and write its folder; skipped when its result matches this config."""
    section = ctx.config.gkd
    run_dir: RunDir = ctx.run_dir
    directory = child_dir(run_dir, child.name)
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
        }
    )
    result_fingerprint = stable_hash({"stage": ctx.hashes["gkd"], "child": child.name})
    result_path = directory / "result.json"
    if result_path.is_file() and (directory / "final" / "config.json").is_file():
        if json.loads(result_path.read_text()).get("fingerprint") == result_fingerprint:
            if is_main_process():  # a run killed after the result, before the clean-up below, left them
                shutil.rmtree(directory / "checkpoints", ignore_errors=True)
            return

    student = ctx.family.load_child(run_dir.path(child.path), dtype=ctx.config.parent.dtype)
    objective = DistillationObjective.from_config(section, ctx.registries)
    run = DistillRun(
        corpus=ctx.corpus,
        seq_len=seq_len,
        seed=ctx.config.seed,
        checkpoint_dir=directory / "checkpoints",
        fingerprint=fingerprint,
        label=f"GKD {child.name}",
        local_rank=ctx.role.local_rank,
    )
    model, log, totals = distill(student, ctx.parent, ctx.family, objective, section, run)
    if is_main_process():
        trained = LoadedModel(model=model.cpu().eval(), tokenizer=student.tokenizer, shape=student.shape,
                              source=f"{child.name} after GKD")
        with atomic_dir(directory / "final") as tmp:
            ctx.family.export(trained, tmp)
        atomic_write_json(directory / "log.json", CONVERTER.unstructure(log))
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
        atomic_write_json(result_path, CONVERTER.unstructure(result))
        if result.kl_after > result.kl_before:
            warnings.warn(
                f"GKD raised the validation KL of child '{child.name}' from {result.kl_before:.4g} to "
                f"{result.kl_after:.4g}: the assembled child was closer to the parent. Both are evaluated; for "
                f"a better uptrained one lower gkd.lr (now {section.lr}) or raise gkd.batch_size / gkd.grad_accum.",
                GKDWarning,
                stacklevel=2,
            )
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
    barrier()


def selected_children(ctx) -> list[ChildRecord]:
    section = ctx.config.gkd
    if not section.enabled:
        return []
    children = read_children(ctx.run_dir)
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
    results = [json.loads((child_dir(run_dir, c.name) / "result.json").read_text()) for c in children]
    index_path = run_dir.path(*GKD_INDEX)
    if is_main_process():
        atomic_write_json(index_path, {"children": results})
    barrier()
    return [index_path] + [p for c in children for p in _outputs(child_dir(run_dir, c.name))]
