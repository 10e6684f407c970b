"""The ablation tables, frontier plots and README section (benchmarks/render.py)."""

from __future__ import annotations

import copy

from benchmarks import render


def section(text: str) -> str:
    return text[text.index(render.START) + len(render.START):text.index(render.END)]


def test_the_readme_section_is_what_the_committed_results_render():
    assert section(render.README.read_text()) == "\n" + render.readme_section(), (
        "benchmarks/README.md's ablation results are stale: run .venv/bin/python benchmarks/render.py")


def arm(name: str, speedup: float, chance_adjusted: float, kl: float) -> dict:
    interval = {"value": chance_adjusted, "low": chance_adjusted - 0.1, "high": chance_adjusted + 0.1}
    return {
        "name": name, "status": "ok", "note": "", "child": {"solver": name.split("-")[0]}, "git_commit": "c" * 40,
        "seconds": 60.0,
        "metrics": {
            "predicted_speedup": speedup, "params": 10,
            "accuracy_preserved_before_gkd": interval, "accuracy_preserved_chance_adjusted_before_gkd": interval,
            "after_gkd": None,
            "assembled": {"kl_to_parent": kl, "measured_speedup": speedup * 0.9, "measured_speedup_q1": speedup * 0.8,
                          "measured_speedup_q3": speedup},
        },
    }


RESULTS = {
    "ablation": "search", "description": "d", "paper": "", "reference": "mip-1.5x", "command": "puzzle bench search",
    "environment": {"budget": "full", "base_config": "configs/demo.yaml", "device": "cpu", "cpu": "x", "cpu_count": 2,
                    "load_average": [0.5], "threads": [2], "seeds": [0], "packages": {"torch": "2"},
                    "git_commit": "c" * 40, "git_dirty": False},
    "arms": [arm("mip-1.5x", 1.5, 0.5, 0.4), arm("mip-2x", 2.0, 0.2, 0.9), arm("greedy-2x", 2.0, 0.1, 1.0),
             arm("layer_drop", 1.5, 0.0, 2.0)],
    "comparison": {"kl_to_parent_vs_reference": {"mip-1.5x": 1.0, "mip-2x": 2.25},
                   "accuracy_vs_reference": {"mip-1.5x": {"difference": {"value": 0.0, "low": 0.0, "high": 0.0}},
                                             "mip-2x": {"difference": {"value": -0.031, "low": -0.05, "high": -0.01}}}},
}


def test_the_table_shows_spread_intervals_and_the_comparison_with_the_reference_arm():
    table = render.markdown_table(RESULTS)
    header, _, mip, steeper, *_ = table.splitlines()
    assert "KL after GKD" not in header, "no arm ran GKD"
    assert "accuracy vs mip-1.5x, points (tasks above chance)" in header and "chance-adjusted assembled" in header
    assert "| 1.80 [1.60, 2.00] |" in steeper and "| -3.1 [-5.0, -1.0] |" in steeper and "| 2.25x |" in steeper
    assert "| 20.0% [10.0, 30.0] |" in steeper and "| +0.0 [+0.0, +0.0] |" in mip


def test_budgeted_arms_are_also_compared_with_the_reference_method_at_their_own_budget():
    results = copy.deepcopy(RESULTS)
    results["comparison"]["accuracy_vs_same_budget"] = {
        "mip-1.5x": {"difference": {"value": 0.0, "low": 0.0, "high": 0.0}},
        "mip-2x": {"difference": {"value": 0.0, "low": 0.0, "high": 0.0}},
        "greedy-2x": {"difference": {"value": 0.012, "low": -0.004, "high": 0.03}}, "layer_drop": None}
    header, _, _, steeper, greedy, unbudgeted = render.markdown_table(results).splitlines()
    assert header.count("| accuracy vs ") == 2 and "| accuracy vs mip at the same budget, points |" in header
    assert "| -3.1 [-5.0, -1.0] | +0.0 [+0.0, +0.0] |" in steeper  # vs mip-1.5x, vs itself
    assert "| +1.2 [-0.4, +3.0] |" in greedy and unbudgeted.count("| – |") >= 2
    results["comparison"]["accuracy_vs_same_budget"] = {name: None for name in ("mip-1.5x", "mip-2x")}
    assert "same budget" not in render.markdown_table(results), "no counterpart was evaluated: no column"


def test_the_pooled_comparison_over_budgets_is_one_line_per_method():
    assert render.pooled_line(RESULTS) == "", "nothing pooled"
    results = copy.deepcopy(RESULTS)
    results["comparison"]["pooled_vs_same_budget"] = {
        "greedy": {"difference": {"value": 0.009, "low": 0.001, "high": 0.018}, "budgets": ["1.5x", "2x"], "items": 4018}}
    line = render.pooled_line(results)
    assert line.startswith("Against mip at the same budget, pooled")
    assert "greedy +0.9 [+0.1, +1.8] points at 1.5x, 2x (4,018 item pairs)." in line
    assert line in render.ablation_markdown(results)


def test_each_pair_of_methods_is_a_line_with_its_budgets_and_the_pooled_difference():
    assert render.pairs_lines(RESULTS) == "", "no pairs"
    results = copy.deepcopy(RESULTS)
    difference = {"difference": {"value": -0.004, "low": -0.021, "high": 0.012}}
    results["comparison"]["pairs"] = [
        {"method": "greedy", "against": "mip", "per_arm": {"greedy-2x": difference},
         "pooled": {**difference, "budgets": ["2x"], "items": 2009}},
        {"method": "mip", "against": "greedy", "per_arm": {}, "pooled": None}]
    text = render.pairs_lines(results)
    assert text.count("\n- ") == 1, "a pair that was never evaluated is left out"
    assert text.endswith("- greedy against mip, points: 2x -0.4 [-2.1, +1.2]; pooled -0.4 [-2.1, +1.2] "
                         "(2,009 item pairs).")
    assert text in render.ablation_markdown(results)


def test_results_from_a_changed_tree_say_so_loudly():
    assert "uncommitted" not in render.provenance(RESULTS)
    dirty = copy.deepcopy(RESULTS)
    dirty["environment"].update(git_dirty=True, git_changes=["plugins/search_mip.py"])
    dirty["arms"][0]["git_commit"] = "e" * 40
    text = render.provenance(dirty)
    assert text.startswith("**From a checkout with uncommitted changes (plugins/search_mip.py")
    assert "earlier commits, reused unchanged: eeeeeeeeee" in text and "4.0 min of arm time" in text


def test_the_frontier_joins_each_methods_budgets_and_skips_single_points(tmp_path):
    groups = render.frontier_points(RESULTS)
    assert {method: [a["name"] for a in arms] for method, arms in groups.items()} == {"mip": ["mip-1.5x", "mip-2x"]}
    assert render.write_frontier(RESULTS, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    single = {**RESULTS, "arms": RESULTS["arms"][2:]}
    assert not render.write_frontier(single, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
