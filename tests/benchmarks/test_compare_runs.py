"""benchmarks/compare_runs.py sets finished runs' main children side by side, whatever their blocks."""

from __future__ import annotations

import json

import pytest
from test_gkd_tokens import BLOCKS, finished_run

from benchmarks import compare_runs


def test_children_of_different_blocks_and_budgets_are_paired_with_the_first_on_tasks_above_chance(tmp_path, capsys):
    demo = finished_run(tmp_path, "demo", 256, correct=10)
    quality = finished_run(tmp_path, "quality", 4096, correct=14, blocks=BLOCKS[::-1])
    (quality / "config.yaml").write_text("library: {tokens: 131072}\nscoring: {tokens: 2048}\nsearch: {speedup: 1.6}\n"
                                         "data: {corpus: {name: mix, corpora: [demo, knowledge]}}\n")
    out = tmp_path / "compare.json"
    assert compare_runs.main([str(demo), str(quality), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    first, second = results["rows"]
    assert results["tasks_above_chance"] == ["two_choice"]
    assert [row["child"]["blocks"] for row in (first, second)] == [BLOCKS, BLOCKS[::-1]]
    assert (second["bld_tokens"], second["scoring_tokens"], second["gkd_tokens"]) == (131072, 2048, 4096)
    assert (second["search_text"], second["target_speedup"]) == ("demo+knowledge", 1.6)
    assert first["search_text"] != second["search_text"] and first["bld_tokens"] != 131072  # the defaults
    assert first["vs_first"]["difference"]["value"] == pytest.approx(0.0)
    assert second["vs_first"]["difference"]["value"] == pytest.approx((14 - 10) / 20)
    assert list(second["vs_first"]["tasks"]) == ["two_choice"]  # the parent is at chance on the other
    assert "+20.0 [" in capsys.readouterr().out
