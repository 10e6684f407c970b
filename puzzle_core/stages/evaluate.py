"""Stage ``evaluate``: measure the parent and every child, before and after GKD.

The evaluators are ``evaluation.evaluators`` (default: ``kl_to_parent`` + ``throughput``;
add ``lm_eval`` for benchmark accuracy). Each model's numbers go to
``eval/models/<model>.json`` as soon as they exist, so a crash loses at most one model;
evaluators that score items save each item's score under ``eval/items/<model>/`` first
(:func:`puzzle_core.evaluation.write_task_items`), for the report's paired intervals;
``eval/results.json`` joins them::

    {"evaluators": [{"name": "kl_to_parent", ...}, ...],
     "models": {"parent":  {"role": "parent", "child": null, "phase": null, "path": null, "params": 134515008,
                            "metrics": {"kl_to_parent": 0.0, "throughput_tok_s": 812.0, ...}, "seconds": 9.1},
                "mip":     {"role": "child", "child": "mip", "phase": "assembled", "path": "children/mip", ...},
                "mip+gkd": {"role": "child", "child": "mip", "phase": "gkd", "path": "gkd/mip/final", ...,
                            "reused": {"throughput": "mip"}}}}

A child after GKD has its assembled twin's architecture, so evaluators that measure the
architecture alone (``architecture_only``, e.g. ``throughput``) do not run again: the
twin's numbers are copied, and ``reused`` says so.
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Literal

import attrs
from tqdm.auto import tqdm

from puzzle_core import layout
from puzzle_core.choices import EvaluatorChoice
from puzzle_core.config import stable_hash, structure, unstructure
from puzzle_core.evaluation import eval_context, evaluate_all
from puzzle_core.interfaces import LoadedModel, parameter_count
from puzzle_core.layout import EvalResults, ModelEvaluation
from puzzle_core.rundir import RunDir

DEFAULT_EVALUATORS = ("kl_to_parent", "throughput")


@attrs.frozen
class Candidate:
    """A model still to evaluate and how to load it."""

    key: str
    role: Literal["parent", "child"]
    child: str | None
    phase: Literal["assembled", "gkd"] | None
    path: str | None
    load: Callable[[], LoadedModel]


def evaluator_choices(ctx) -> list[EvaluatorChoice]:
    configured = ctx.config.evaluation.evaluators
    return list(configured) if configured else [structure(name, EvaluatorChoice) for name in DEFAULT_EVALUATORS]


def candidates(ctx) -> list[Candidate]:
    """The parent, then each child as assembled and (when GKD ran for it) after GKD."""
    run_dir: RunDir = ctx.run_dir
    dtype = ctx.config.parent.dtype
    uptrained = layout.read_gkd_results(run_dir)
    found = [Candidate("parent", "parent", None, None, None, lambda: ctx.parent)]
    for child in layout.read_children(run_dir):
        found.append(Candidate(child.name, "child", child.name, "assembled", child.path,
                               lambda p=child.path: ctx.family.load_child(run_dir.path(p), dtype=dtype)))
        if child.name in uptrained:
            final = layout.gkd_final(run_dir, child.name)
            found.append(Candidate(layout.uptrained(child.name), "child", child.name, "gkd", layout.relative(run_dir, final),
                                   lambda f=final: ctx.family.load_child(f, dtype=dtype)))
    return found


EVALUATED_WITH = ("parent", "seed", "threads", "data", "scenario", "evaluation")


def model_fingerprint(ctx, candidate: Candidate) -> str:
    """What a model's numbers depend on: the sections it is evaluated with, and what made it.

    The parent is made by nothing upstream, a child as assembled by the stages up to
    ``assemble``, a child after GKD by every stage. So run directories that differ only
    downstream of a model (an ablation's arms: the parent for all, the assembled child for
    arms that differ in GKD alone) reuse its evaluation: ``eval/`` is a cache of this stage.
    """
    config = unstructure(ctx.config)
    evaluated_with = {section: config[section] for section in EVALUATED_WITH}
    if candidate.role == "parent":
        return stable_hash({"model": candidate.key, **evaluated_with})
    if candidate.phase == "assembled":
        return stable_hash({"model": candidate.key, "upstream": ctx.hashes["assemble"], **evaluated_with})
    return stable_hash({"stage": ctx.hashes["evaluate"], "model": candidate.key})


def forget_others(run_dir: RunDir, models: set[str]) -> None:
    """Delete evaluations of models this run no longer has (a donor's, or a removed child's)."""
    for path in run_dir.path(layout.EVAL_MODELS).glob("*.json"):
        if path.stem not in models:
            path.unlink()
    for path in run_dir.path(layout.EVAL_ITEMS).glob("*"):
        if path.is_dir() and path.name not in models:
            shutil.rmtree(path)


def run(ctx) -> list[Path]:
    if not ctx.role.is_driver:
        return []  # under torchrun the driver evaluates alone: timings must not share the machine
    run_dir: RunDir = ctx.run_dir
    choices = evaluator_choices(ctx)
    evaluators = [(choice.name, ctx.registries.record(choice).create(choice.options)) for choice in choices]
    context = eval_context(ctx)
    todo = candidates(ctx)
    results: dict[str, ModelEvaluation] = {}
    written = []
    bar = tqdm(todo, desc="evaluating", unit="model", file=sys.stderr, dynamic_ncols=True)
    for candidate in bar:
        bar.set_postfix_str(candidate.key)
        path = layout.eval_model_path(run_dir, candidate.key)
        items_dir = layout.eval_items_dir(run_dir, candidate.key)
        fingerprint = model_fingerprint(ctx, candidate)
        previous = layout.read_model_evaluation(run_dir, candidate.key)
        if previous is not None:
            if previous.fingerprint == fingerprint:
                results[candidate.key] = previous
                written += [path, *sorted(items_dir.glob("*.json"))]
                continue
        if items_dir.is_dir():
            shutil.rmtree(items_dir)  # a stale evaluation's items must not pair with the new ones
        started = time.perf_counter()
        model = candidate.load()
        twin = results.get(candidate.child) if candidate.phase == "gkd" else None
        reused = [(n, e) for n, e in evaluators if twin is not None and e.architecture_only]
        metrics = evaluate_all(model, [pair for pair in evaluators if pair not in reused],
                               attrs.evolve(context, items_dir=items_dir))
        if reused:  # GKD changed the weights, not the architecture: the assembled child's numbers stand
            metrics.update({k: v for k, v in twin.metrics.items() if k not in metrics})
        evaluation = ModelEvaluation(
            role=candidate.role,
            child=candidate.child,
            phase=candidate.phase,
            path=candidate.path,
            params=parameter_count(model.model),
            metrics=metrics,
            seconds=time.perf_counter() - started,
            fingerprint=fingerprint,
            reused={name: candidate.child for name, _ in reused},
        )
        layout.write_model_evaluation(run_dir, candidate.key, evaluation)
        results[candidate.key] = evaluation
        written += [path, *sorted(items_dir.glob("*.json"))]
        if candidate.role == "child":
            del model
            gc.collect()
    bar.close()
    forget_others(run_dir, set(results))
    results_path = layout.write_eval_results(run_dir, EvalResults([unstructure(c) for c in choices], results))
    return [results_path, *written]
