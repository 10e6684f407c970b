"""benchmarks/eval_children.py re-evaluates a finished run's children as the pipeline evaluated them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks import eval_children

ROOT = Path(__file__).resolve().parents[2]


def run(monkeypatch, *argv) -> None:
    monkeypatch.setattr(sys, "argv", ["eval_children.py", *map(str, argv)])
    eval_children.main()


def test_children_are_re_evaluated_paired_with_the_parent(tiny_run, tmp_path, monkeypatch, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
                      "evaluation:\n  evaluators:\n    - {name: kl_to_parent, tokens: 128, seq_len: 32}\n"
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
