"""Task plugins: the ``half_mmlu`` scorer, the ``lm_eval`` evaluator with its suite, the ``knowledge`` corpus.

Both read MMLU and its subject halves (:mod:`.mmlu`): blocks are scored on one half and
children evaluated on the other, so they must agree on the split. The evaluation suite
(:mod:`.suite`) is lm-eval's own task definitions on local validation sets;
:mod:`.harness` is the lm-eval model that scores them; :mod:`.evaluator` runs them and
saves every item's score for the report's paired confidence intervals. :mod:`.knowledge`
is distillation text from the offline question sets the suite does not evaluate.
"""

from __future__ import annotations

from puzzle_core.api import CorpusPlugin, EvaluatorPlugin, ScorerPlugin, hookimpl


@hookimpl
def puzzle_scorers() -> list[ScorerPlugin]:
    from puzzle_plugins.tasks.half_mmlu import HalfTaskAccuracy, HalfTaskOptions

    return [
        ScorerPlugin(
            name="half_mmlu",
            implementation=HalfTaskAccuracy,
            options=HalfTaskOptions,
            description="accuracy on the scoring half of MMLU's subjects (answer-text log-likelihood), block replaced alone",
        )
    ]


@hookimpl
def puzzle_evaluators() -> list[EvaluatorPlugin]:
    from puzzle_plugins.tasks.evaluator import LmEvalEvaluator, LmEvalOptions

    return [
        EvaluatorPlugin(
            name="lm_eval",
            implementation=LmEvalEvaluator,
            options=LmEvalOptions,
            description="lm-evaluation-harness offline: HellaSwag, ARC, Winogrande, OpenBookQA, BoolQ, held-out MMLU, "
            "your YAML; per-item scores for paired intervals",
        )
    ]


@hookimpl
def puzzle_corpora() -> list[CorpusPlugin]:
    from puzzle_plugins.tasks.knowledge import KnowledgeCorpus, KnowledgeOptions

    return [
        CorpusPlugin(
            name="knowledge",
            implementation=KnowledgeCorpus,
            options=KnowledgeOptions,
            description="questions with answers (SciQ, TriviaQA, NQ, PIQA, Social IQa, CommonsenseQA, MMLU's score "
            "half): none of the suite's items",
        )
    ]
