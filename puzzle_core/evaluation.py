"""Running several evaluators on one model, in a pipeline run's context, and per-item scores.

An :class:`~puzzle_core.interfaces.Evaluator` returns flat named numbers
(``hellaswag.acc_norm``, ``kl_to_parent``, ``throughput_tok_s``...); names from
different evaluators must not collide, so a report can merge them into one table.

An evaluator that scores items (questions) also saves each item's score with
:func:`write_task_items` under ``EvalContext.items_dir`` (in a run:
``eval/items/<model>/<task>.json``). The report pairs a child's items with the
parent's and puts confidence intervals on every accuracy comparison
(:mod:`puzzle_core.stats`); tasks without saved items get no interval and do not
count in "accuracy preserved".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import attrs

from puzzle_core import layout
from puzzle_core.config import CONVERTER, unstructure
from puzzle_core.interfaces import EvalContext, Evaluator, LoadedModel
from puzzle_core.rundir import atomic_write_json


def eval_context(ctx) -> EvalContext:
    """The evaluators' context in a pipeline run (:class:`puzzle_core.pipeline.RunContext`)."""
    return EvalContext(
        parent=ctx.parent,
        corpus=ctx.tokenized(ctx.config.evaluation_corpus),
        scenario=ctx.config.scenario,
        threads=ctx.config.threads,
        seed=ctx.config.seed,
        cache_dir=ctx.run_dir.path(layout.EVAL_CACHE),
    )


def evaluate_all(model: LoadedModel, evaluators: Sequence[tuple[str, Evaluator]], context: EvalContext) -> dict[str, float]:
    """Every evaluator's numbers for ``model``, merged; a name two evaluators both produce is an error."""
    merged: dict[str, float] = {}
    owner: dict[str, str] = {}
    for name, evaluator in evaluators:
        for metric, value in evaluator.evaluate(model, context).items():
            if metric in merged:
                raise ValueError(f"evaluators '{owner[metric]}' and '{name}' both report '{metric}'")
            merged[metric], owner[metric] = float(value), name
    return merged


@attrs.frozen
class TaskItems:
    """One model's score on every evaluated item of one task, for paired statistics.

    ``ids`` name the items (their index in the task's evaluation split); ``fingerprint``
    digests the items' documents and prompts, so two models' items only pair when they
    saw the same questions. ``chance`` is per item the expected score of a uniform guess
    (``1 / #choices``; 0 for open-ended answers).
    """

    task: str
    ids: list[int]
    metrics: dict[str, list[float]]  # metric -> one value per item, in ``ids`` order
    chance: list[float]
    fingerprint: str
    seconds: float = 0.0  # wall time of this task for this model
    tokens: int = 0  # tokens the model read for it

    def __attrs_post_init__(self):
        lengths = {len(self.ids), len(self.chance), *(len(values) for values in self.metrics.values())}
        if len(lengths) != 1:
            raise ValueError(f"task {self.task!r}: ids, chance and every metric need one value per item")


def write_task_items(folder: Path, items: TaskItems) -> Path:
    """Save ``items`` as ``<folder>/<task>.json`` (atomically); returns the path."""
    path = Path(folder) / f"{items.task}.json"
    atomic_write_json(path, unstructure(items))
    return path


def read_task_items(folder: Path) -> dict[str, TaskItems]:
    """``{task: items}`` saved under ``folder`` (empty when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = (CONVERTER.structure(json.loads(path.read_text()), TaskItems) for path in sorted(folder.glob("*.json")))
    return {items.task: items for items in found}
