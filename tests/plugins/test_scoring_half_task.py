"""The half_mmlu scorer: deterministic disjoint subject halves, accuracy matching the task helper."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from puzzle_core.blocks import FFNSpec
from puzzle_core.scoring import ReplaceOneBlockEngine
from puzzle_plugins.tasks.mmlu import choice_loglikelihoods, load_mmlu, read_questions, sample_per_subject, split_subjects
from tests.tiny import tiny_parent

SUBJECTS = ["algebra", "biology", "chemistry", "drama", "economics", "french"]


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [
        {"question": f"Question {n} about {subject}: which is right?",
         "choices": ["yes", "no, never", "maybe so", "all of the above"], "answer": n % 4, "subject": subject}
        for subject in SUBJECTS for n in range(3)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mmlu_halves_are_deterministic_disjoint_and_cover_every_subject():
    questions = load_mmlu()
    first, again = split_subjects(questions, seed=0), split_subjects(list(reversed(questions)), seed=0)
    assert first == again
    assert not set(first.score) & set(first.eval)
    assert set(first.score) | set(first.eval) == {q.subject for q in questions}
    assert len(first.score) == 28 and len(first.eval) == 29
    assert split_subjects(questions, seed=1) != first
    assert {q.subject for q in load_mmlu(half="score")} == set(first.score)


def test_half_task_scores_only_the_scoring_half_and_records_the_split(registries, questions_file):
    family, parent = tiny_parent(num_layers=2)
    scorer = registries.scorers.get("half_mmlu").create(
        registries.scorers.get("half_mmlu").options(path=str(questions_file), limit=8, questions_per_batch=3))
    assert scorer.higher_is_better
    split = scorer.info()["split"]
    assert sorted(split["score"] + split["eval"]) == SUBJECTS and not set(split["score"]) & set(split["eval"])

    ctx = SimpleNamespace(parent=parent)
    data = scorer.data(ctx)
    assert data.key == scorer.data(ctx).key
    batches = data.load()
    seen_subjects = set()
    for batch in batches:
        rows = batch.extra
        assert batch.input_ids.shape[0] == 4 * len(rows.answers)  # whole questions per batch
        assert sorted(set(rows.question)) == list(range(len(rows.answers)))
    sample = sample_per_subject([q for q in read_questions(questions_file) if q.subject in split["score"]], 8)
    seen_subjects = {q.subject for q in sample}
    assert seen_subjects == set(split["score"])
    assert sum(len(b.extra.answers) for b in batches) == len(sample) == 8


def test_parent_block_accuracy_equals_the_full_model_answer_scoring(registries, questions_file):
    family, parent = tiny_parent(num_layers=2)
    record = registries.scorers.get("half_mmlu")
    scorers = {"half_mmlu": record.create(record.options(path=str(questions_file), limit=9, metric="acc"))}
    runner = family.layer_runner(parent.model)
    batches = scorers["half_mmlu"].data(SimpleNamespace(parent=parent)).load()
    engine = ReplaceOneBlockEngine(runner, batches, keep_log_probs=False, vocab_size=parent.shape.vocab_size,
                                   max_cache_mib=64, references=scorers, progress=False)

    split = split_subjects(read_questions(questions_file))
    sample = sample_per_subject([q for q in read_questions(questions_file) if q.subject in split.score], 9)
    expected = choice_loglikelihoods(parent.model, parent.tokenizer, sample, progress=False)
    assert engine.reference["half_mmlu"] == pytest.approx(expected.acc, abs=1e-9)

    layer = 1
    parent_block = engine.score(layer, runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn"), scorers)
    assert parent_block["half_mmlu"] == pytest.approx(expected.acc, abs=1e-9)
    noop = family.init_sublayer(parent, layer, FFNSpec(no_op=True), None, method="default")
    changed = engine.score(layer, runner.sublayer(layer, "attention"), noop, scorers)
    assert 0.0 <= changed["half_mmlu"] <= 1.0
