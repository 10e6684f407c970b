"""benchmarks/eval_children.py re-evaluates a finished run's children as the pipeline evaluated them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks import eval_children

ROOT = Path(__file__).resolve().parents[2]


def run(monkeypatch, *argv) -> None:
    monkeypatch.setattr(sys, "argv", ["eval_children.py", *map(str, argv)])
    eval_children.main()


def test_children_are_re_evaluated_paired_with_the_parent(tiny_run, tmp_path, monkeypatch, capsys):
    config = tmp_path / "eval.yaml"
    # KL is measured on evaluation.corpus, the pipeline's text, whatever data.corpus says
    config.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\ndata: {{corpus: demo}}\n"
                      "evaluation:\n  corpus: synthetic\n  evaluators:\n    - {name: kl_to_parent, tokens: 128, seq_len: 32}\n"
                      "    - {name: lm_eval, tasks: [arc_easy], default_limit: 6}\n")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.root, run_dir)
    run(monkeypatch, run_dir, "--config", config, "--out", tmp_path / "out")
    results = json.loads((tmp_path / "out" / "run.json").read_text())
    assert list(results["models"]) == ["parent", "greedy", "mip", "mip+gkd"]
    for name in ("greedy", "mip", "mip+gkd"):  # the pipeline's own KL, from its evaluate stage
        pipeline = json.loads((run_dir / "eval" / "models" / f"{name}.json").read_text())["metrics"]["kl_to_parent"]
        assert results["models"][name]["metrics"]["kl_to_parent"] == pipeline
        accuracy = results["models"][name]["accuracy"]
        assert accuracy["tasks"]["arc_easy"]["items"] == 6 and accuracy["unpaired"] == []
    assert "chance-adjusted" in capsys.readouterr().out

    # the parent's items of that run are reused: the same items pair, and the child's numbers repeat
    run(monkeypatch, run_dir, "--config", config, "--out", tmp_path / "again", "--children", "mip",
        "--parent-items", tmp_path / "out" / "run" / "items" / "parent")
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    assert list(again["models"]) == ["parent", "mip"]
    assert again["models"]["mip"]["accuracy"] == results["models"]["mip"]["accuracy"]


def test_children_of_several_runs_share_one_parent_and_pair_with_the_first(tiny_run, tmp_path, monkeypatch):
    config = tmp_path / "eval.yaml"
    config.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
                      "evaluation:\n  evaluators:\n    - {name: kl_to_parent, tokens: 128, seq_len: 32}\n"
                      "    - {name: lm_eval, tasks: [arc_easy], default_limit: 8}\n")
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_run.root, first)
    shutil.copytree(tiny_run.root, second)
    shutil.rmtree(second / "gkd")  # the second run's child as assembled only
    # the tiny random parent is at chance: let every task count as above it, so that the children pair
    monkeypatch.setattr(eval_children, "tasks_above_chance", lambda parent: set(parent))
    run(monkeypatch, first, second, "--config", config, "--out", tmp_path / "out", "--name", "both",
        "--children", "mip+gkd", "mip")
    results = json.loads((tmp_path / "out" / "both.json").read_text())
    models = results["models"]
    assert list(models) == ["parent", "first/mip", "first/mip+gkd", "second/mip"]
    assert results["run_dirs"] == ["first", "second"]
    # the same child in two runs answers alike, so its difference to the first run's is zero on every item
    assert models["second/mip"]["accuracy"] == models["first/mip"]["accuracy"]
    assert models["second/mip"]["vs_first"]["difference"]["value"] == 0.0
    # ... and the uptrained child's difference is its accuracy minus the assembled one's
    assert results["tasks_above_chance"] == ["arc_easy"]
    accuracy = {name: models[name]["accuracy"]["tasks"]["arc_easy"]["child"]["value"]
                for name in ("first/mip", "first/mip+gkd")}
    difference = models["first/mip+gkd"]["vs_first"]["tasks"]["arc_easy"]["value"]
    assert difference == pytest.approx(accuracy["first/mip+gkd"] - accuracy["first/mip"])


def test_several_runs_need_a_name(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, tmp_path / "a", tmp_path / "b")
    assert stop.value.code == 2 and "--name" in capsys.readouterr().err
