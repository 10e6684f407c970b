"""benchmarks/gkd_tokens.py compares runs that uptrain one child for different GKD budgets."""

from __future__ import annotations

import json

import pytest

from benchmarks import gkd_tokens
from puzzle_core.evaluation import TaskItems, write_task_items
from puzzle_core.rundir import atomic_write_json

BLOCKS = ["attn_g1+ffn_64", "attn_noop+ffn_128"]
CI = {"value": 0.9, "low": 0.8, "high": 1.0}


def items(task: str, correct: int, chance: float) -> TaskItems:
    hits = [1.0] * correct + [0.0] * (20 - correct)
    return TaskItems(task=task, ids=list(range(20)), metrics={"acc": hits}, chance=[chance] * 20, fingerprint=task)


def finished_run(root, name: str, tokens: int, correct: int, blocks=BLOCKS, lr: float = 1e-4):
    """A run's report summary, GKD log and result, and suite items: the parent's and the child's after GKD.

    The parent gets 12 of 20 on a two-choice task (above chance) and 4 of 20 on a four-choice
    one (below), the child ``correct`` on both.
    """
    run = root / name
    child = {"name": "mip", "main": True, "blocks": blocks, "params": 1000,
             **{key: 0.5 for key in gkd_tokens.SUMMARY_KEYS if "accuracy" not in key},
             **{key: CI for key in gkd_tokens.SUMMARY_KEYS if "accuracy" in key},
             "kl_to_parent_after_gkd": 1 / tokens}
    atomic_write_json(run / "report" / "summary.json", {"children": [child]})
    (run / "config.yaml").write_text(f"gkd:\n  lr: {lr}\n")
    atomic_write_json(run / "gkd" / "mip" / "log.json", {"train": [], "validation": [
        {"step": 0, "tokens": 0, "kl": 1.0}, {"step": tokens // 128, "tokens": tokens, "kl": 64 / tokens}]})
    atomic_write_json(run / "gkd" / "mip" / "result.json", {"tokens": tokens, "steps": tokens // 128,
                                                            "train_seconds": tokens / 100, "tokens_per_second": 100})
    for model, (two, four) in {"parent": (12, 4), "mip+gkd": (correct, correct)}.items():
        write_task_items(run / "eval" / "items" / model, items("two_choice", two, 0.5))
        write_task_items(run / "eval" / "items" / model, items("four_choice", four, 0.25))
    return run


def test_rows_follow_the_tokens_and_pair_each_child_with_the_fewest_tokens_on_tasks_above_chance(tmp_path):
    long = finished_run(tmp_path, "long", 4096, correct=14)
    faster = finished_run(tmp_path, "faster", 256, correct=12, lr=3e-4)
    short = finished_run(tmp_path, "short", 256, correct=10)
    out = tmp_path / "gkd_tokens.json"
    assert gkd_tokens.main([str(long), str(faster), str(short), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["tasks_above_chance"] == ["two_choice"]
    assert results["child"]["blocks"] == BLOCKS
    first, same_tokens, second = results["rows"]
    assert [(r["tokens"], r["lr"]) for r in results["rows"]] == [(256, 1e-4), (256, 3e-4), (4096, 1e-4)]
    assert first["vs_fewest_tokens"]["difference"]["value"] == pytest.approx(0.0)
    assert same_tokens["vs_fewest_tokens"]["difference"]["value"] == pytest.approx((12 - 10) / 20)
    assert second["vs_fewest_tokens"]["difference"]["value"] == pytest.approx((14 - 10) / 20)
    assert second["validation"][-1]["kl"] == pytest.approx(64 / 4096)
    assert second["kl_to_parent_after_gkd"] == pytest.approx(1 / 4096)


def test_runs_of_different_children_or_without_gkd_are_refused(tmp_path, capsys):
    one = finished_run(tmp_path, "one", 256, correct=10)
    other = finished_run(tmp_path, "other", 512, correct=10, blocks=BLOCKS[::-1])
    assert gkd_tokens.main([str(one), str(other), "--out", str(tmp_path / "x.json")]) == 2
    assert "uptrain different children" in capsys.readouterr().err
    (other / "report" / "summary.json").unlink()
    assert gkd_tokens.main([str(one), str(other), "--out", str(tmp_path / "x.json")]) == 2
    assert "summary.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
