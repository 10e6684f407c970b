"""Running several evaluators on one model, in a pipeline run's context.

An :class:`~puzzle_core.interfaces.Evaluator` returns flat named numbers
(``mmlu_heldout.acc_norm``, ``kl_to_parent``, ``throughput_tok_s``...); names from
different evaluators must not collide, so a report can merge them into one table.
"""

from __future__ import annotations

from typing import Sequence

from puzzle_core.interfaces import EvalContext, Evaluator, LoadedModel


def eval_context(ctx) -> EvalContext:
    """The evaluators' context in a pipeline run (:class:`puzzle_core.pipeline.RunContext`)."""
    return EvalContext(
        parent=ctx.parent,
        corpus=ctx.corpus,
        scenario=ctx.config.scenario,
        threads=ctx.config.threads,
        seed=ctx.config.seed,
        cache_dir=ctx.run_dir.path("eval", "cache"),
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
