"""benchmarks/gkd_data.py compares runs that uptrain one child on different text."""

from __future__ import annotations

import json

import pytest
from test_gkd_tokens import BLOCKS, finished_run

from benchmarks import gkd_data


def test_each_text_is_paired_with_the_first_runs_on_tasks_above_chance(tmp_path, capsys):
    demo = finished_run(tmp_path, "demo", 256, correct=10)
    knowledge = finished_run(tmp_path, "knowledge", 256, correct=14)
    (knowledge / "config.yaml").write_text("gkd:\n  corpus: knowledge\n")
    mixed = finished_run(tmp_path, "mix", 256, correct=9)
    (mixed / "config.yaml").write_text("gkd:\n  corpus: {name: mix, corpora: [demo, knowledge]}\n")
    out = tmp_path / "gkd_data.json"
    assert gkd_data.main([str(demo), str(knowledge), str(mixed), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["label"] for row in rows] == ["demo", "knowledge", "demo+knowledge"]
    assert [row["vs_reference"]["difference"]["value"] for row in rows] == pytest.approx([0.0, 4 / 20, -1 / 20])
    assert list(rows[1]["vs_reference"]["tasks"]) == ["two_choice"]  # the parent is at chance on the other
    printed = capsys.readouterr().out
    assert "demo+knowledge" in printed and "+20.0" in printed


def test_runs_of_different_children_are_refused(tmp_path, capsys):
    one = finished_run(tmp_path, "one", 256, correct=10)
    other = finished_run(tmp_path, "other", 256, correct=10, blocks=BLOCKS[::-1])
    assert gkd_data.main([str(one), str(other), "--out", str(tmp_path / "x.json")]) == 2
    assert "uptrain different children" in capsys.readouterr().err
