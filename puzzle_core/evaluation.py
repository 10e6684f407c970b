"""What evaluators get besides the model, and running several of them.

An :class:`~puzzle_core.interfaces.Evaluator` returns flat named numbers
(``mmlu_heldout.acc_norm``, ``kl_to_parent``, ``throughput_tok_s``...); names from
different evaluators must not collide, so a report can merge them into one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import attrs

from puzzle_core.cache import cache_root
from puzzle_core.interfaces import Evaluator, LoadedModel
from puzzle_core.schema import Scenario


@attrs.frozen
class EvalContext:
    """The parent (reference for KL), the run's corpus, the scenario, and run settings."""

    parent: LoadedModel | None = None
    corpus: Any = None  # puzzle_core.data.Corpus
    scenario: Scenario = attrs.Factory(Scenario)
    threads: int = 2
    seed: int = 0
    cache_dir: Path = attrs.Factory(lambda: cache_root() / "eval")  # scratch files evaluators may reuse

    @classmethod
    def from_run(cls, ctx) -> "EvalContext":
        """The context of a pipeline run (:class:`puzzle_core.pipeline.RunContext`)."""
        return cls(
            parent=ctx.parent,
            corpus=ctx.corpus,
            scenario=ctx.config.scenario,
            threads=ctx.config.threads,
            seed=ctx.config.seed,
            cache_dir=ctx.run_dir.path("eval", "cache"),
        )

    def require_parent(self, evaluator: str) -> LoadedModel:
        if self.parent is None:
            raise ValueError(f"the {evaluator} evaluator needs the parent in its EvalContext")
        return self.parent

    def require_corpus(self, evaluator: str):
        if self.corpus is None:
            raise ValueError(f"the {evaluator} evaluator needs a corpus in its EvalContext")
        return self.corpus


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
