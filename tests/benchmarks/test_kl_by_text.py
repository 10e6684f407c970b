"""benchmarks/kl_by_text.py measures finished runs' children on other text and ranks them against the suite."""

from __future__ import annotations

import json
import shutil

import pytest
from test_gkd_tokens import items

from benchmarks import kl_by_text
from puzzle_core import layout
from puzzle_core.evaluation import write_task_items
from puzzle_core.rundir import RunDir
from puzzle_core.schema import load_config


@pytest.fixture
def scored_run(tiny_run, tmp_path):
    """The session's tiny run with suite items: the parent above chance, each child worse the higher its KL."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run)
    models = json.loads((run / layout.EVAL_RESULTS).read_text())["models"]
    kl = {key: found["metrics"]["kl_to_parent"] for key, found in models.items() if found["role"] == "child"}
    levels = sorted(set(kl.values()))  # children with the same blocks share a KL, and so an accuracy
    assert len(levels) >= 2, kl
    write_task_items(layout.eval_items_dir(RunDir(run), "parent"), items("two_choice", 18, 0.5))
    for model, value in kl.items():
        write_task_items(layout.eval_items_dir(RunDir(run), model), items("two_choice", 16 - 2 * levels.index(value), 0.5))
    return run, models


def test_kl_on_the_runs_own_text_repeats_its_number_and_ranks_children_as_constructed(scored_run, tmp_path, capsys):
    run, models = scored_run
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Question {i}: which number follows {i}? Answer: {i + 1}." for i in range(400)))
    out = tmp_path / "kl_by_text.json"
    assert kl_by_text.main([str(run), "--corpus", "synthetic", str(other), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["labels"] == ["synthetic", "files"] and results["tokens"] == 128  # the run's kl_to_parent's
    rows = {row["model"]: row for row in results["rows"]}
    assert rows.keys() == {key for key, found in models.items() if found["role"] == "child"}
    for model, row in rows.items():
        assert row["kl"]["synthetic"] == pytest.approx(models[model]["metrics"]["kl_to_parent"], rel=1e-5)
        assert row["kl"]["files"] > 0 and row["kl"]["files"] != pytest.approx(row["kl"]["synthetic"])
    assert results["spearman_kl_vs_accuracy"]["synthetic"] == pytest.approx(-1.0)
    assert "Spearman(KL, accuracy)" in capsys.readouterr().out


def test_runs_without_evaluation_are_refused(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run)
    shutil.rmtree(run / "eval")
    assert kl_by_text.main([str(run), "--out", str(tmp_path / "x.json")]) == 2
    assert "no evaluation results" in capsys.readouterr().err


def test_runs_pair_when_they_measure_on_the_same_text_whatever_they_search_on(scored_run, tmp_path, capsys):
    run, _ = scored_run
    config = (run / layout.CONFIG).read_text()
    assert "\ndata:\n  corpus: synthetic\n" in config and "\n  corpus:" not in config.split("\nevaluation:")[1]
    searched_elsewhere, measured_elsewhere = tmp_path / "searched", tmp_path / "measured"
    for folder, evaluation_text in ((searched_elsewhere, "synthetic"), (measured_elsewhere, "demo")):
        shutil.copytree(run, folder)
        data = config.replace("\ndata:\n  corpus: synthetic\n", "\ndata:\n  corpus: knowledge\n")
        (folder / layout.CONFIG).write_text(data.replace("\nevaluation:\n", f"\nevaluation:\n  corpus: {evaluation_text}\n"))
    assert [c.name for c in kl_by_text.evaluated_alike(load_config(searched_elsewhere / layout.CONFIG))[3:]] == ["synthetic"]
    assert kl_by_text.evaluated_alike(load_config(searched_elsewhere / layout.CONFIG)) == \
        kl_by_text.evaluated_alike(load_config(run / layout.CONFIG))
    assert kl_by_text.main([str(run), str(measured_elsewhere), "--out", str(tmp_path / "x.json")]) == 2
    assert "another parent, seed or evaluation" in capsys.readouterr().err
