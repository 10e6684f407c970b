"""``half_mmlu``: replace-1-block accuracy on the scoring half of a multiple-choice task set.

MMLU's subjects are split in two (:func:`puzzle_plugins.tasks.mmlu.split_subjects`, deterministic
in the seed); blocks are scored on questions of the ``score`` half only, so children can
be evaluated on the untouched ``eval`` half. Each answer text is scored as a
continuation of the question (lm-eval's continuation style); the prediction is the
answer with the highest log-likelihood per character (``acc_norm``) or in total
(``acc``). Any JSONL of ``{"question", "choices", "answer", "subject"}`` records can
replace MMLU (``path``).

A batch holds whole questions (all their answers), so accuracy reduces per batch; only
the answer positions go through the LM head.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from puzzle_core.api import ModelOutputs, Scorer, ScoringBatch, ScoringData
from puzzle_plugins.tasks.mmlu import ChoiceScores, Question, choice_requests, load_mmlu, sample_per_subject, split_subjects


@attrs.frozen
class HalfTaskOptions:
    path: str | None = None  # a question JSONL; None: MMLU (as `puzzle data prepare` writes it)
    seed: int = 0  # subject split (use the same seed as the evaluation's held-out half) and sampling
    limit: int = attrs.field(default=56, validator=attrs.validators.ge(1))  # questions scored, spread over subjects
    questions_per_batch: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    metric: Literal["acc_norm", "acc"] = "acc_norm"


@attrs.frozen
class AnswerRows:
    """Per row of a batch: which question (within the batch) and answer it is, and where the answer tokens are."""

    question: tuple[int, ...]  # index into ``answers``
    choice: tuple[int, ...]
    start: tuple[int, ...]  # first position whose next-token prediction is an answer token
    targets: tuple[tuple[int, ...], ...]  # the answer tokens
    answers: tuple[int, ...]  # per question: index of the correct choice
    choice_chars: tuple[tuple[int, ...], ...]  # per question: characters of each choice (for acc_norm)


def question_batches(tokenizer, questions: list[Question], questions_per_batch: int, max_length: int,
                     pad_id: int) -> list[ScoringBatch]:
    """Right-padded batches of whole questions, longest first (less padding)."""
    requests = choice_requests(tokenizer, questions, max_length)
    by_question: dict[int, list] = {}
    for request in requests:
        by_question.setdefault(request[0], []).append(request)
    order = sorted(by_question, key=lambda qi: -max(len(r[2]) for r in by_question[qi]))
    batches = []
    for first in range(0, len(order), questions_per_batch):
        chosen = order[first:first + questions_per_batch]
        rows = [r for qi in chosen for r in by_question[qi]]
        width = max(len(sequence) - 1 for _, _, sequence, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (_, _, sequence, _) in enumerate(rows):
            ids[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
            mask[row, : len(sequence) - 1] = True
        slot = {qi: k for k, qi in enumerate(chosen)}
        extra = AnswerRows(
            question=tuple(slot[qi] for qi, _, _, _ in rows),
            choice=tuple(ci for _, ci, _, _ in rows),
            start=tuple(len(sequence) - 1 - n for _, _, sequence, n in rows),
            targets=tuple(tuple(sequence[-n:]) for _, _, sequence, n in rows),
            answers=tuple(questions[qi].answer for qi in chosen),
            choice_chars=tuple(tuple(len(c) for c in questions[qi].choices) for qi in chosen),
        )
        batches.append(ScoringBatch(input_ids=ids, mask=mask, extra=extra))
    return batches


class HalfTaskAccuracy(Scorer):
    """Accuracy on the scoring half of a task set's subjects, block replaced alone."""

    higher_is_better = True

    def questions(self) -> list[Question]:
        return load_mmlu(half=None, path=self.options.path)

    def split(self, questions: list[Question] | None = None):
        return split_subjects(questions if questions is not None else self.questions(), "subject", self.options.seed)

    def data(self, ctx) -> ScoringData:
        options = self.options

        def load() -> list[ScoringBatch]:
            questions = self.questions()
            keep = set(self.split(questions).score)
            sample = sample_per_subject([q for q in questions if q.subject in keep], options.limit, options.seed)
            tokenizer = ctx.parent.tokenizer
            max_length = getattr(ctx.parent.model.config, "max_position_embeddings", None) or 2048
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            return question_batches(tokenizer, sample, options.questions_per_batch, max_length, pad)

        source = options.path or "mmlu"
        return ScoringData(
            key=f"half-task/{source}/seed{options.seed}/limit{options.limit}/q{options.questions_per_batch}",
            load=load,
            description=f"up to {options.limit} questions of the scoring half of {source}'s subjects ({options.metric})",
        )

    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        rows: AnswerRows = batch.extra
        positions = [(row, start + k) for row, (start, targets) in enumerate(zip(rows.start, rows.targets))
                     for k in range(len(targets))]
        index = torch.tensor(positions, device=child.hidden.device)
        log_probs = torch.log_softmax(child.head(child.hidden[index[:, 0], index[:, 1]]).float(), dim=-1)
        targets = torch.tensor([t for targets in rows.targets for t in targets], device=log_probs.device)
        token_ll = log_probs.gather(1, targets[:, None]).squeeze(1)
        row_of_token = index[:, 0]
        per_row = torch.zeros(len(rows.start), dtype=torch.float64, device=token_ll.device)
        per_row.index_add_(0, row_of_token, token_ll.double())
        loglikelihoods = [[0.0] * len(chars) for chars in rows.choice_chars]
        for row, value in enumerate(per_row.tolist()):
            loglikelihoods[rows.question[row]][rows.choice[row]] = value
        scores = ChoiceScores(tuple(map(tuple, loglikelihoods)), rows.choice_chars, rows.answers)
        accuracy = scores.acc_norm if self.options.metric == "acc_norm" else scores.acc
        return float(round(accuracy * len(rows.answers))), float(len(rows.answers))

    def info(self) -> dict:
        return {"split": self.split().to_json(), "limit": self.options.limit}
