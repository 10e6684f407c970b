"""Every shipped ablation end to end at ``--budget small`` (the tiny config), sharing one results folder.

Marked slow: the six together run each arm's search, assembly, GKD and evaluation (lm_eval
included) and take a few minutes on two CPU cores. They run in order, so later ablations
reuse the Puzzle reference arm and the library that earlier ones finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import runner
from puzzle_core.blocks import BlockSpec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ("library", "score", "cost")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def run(name: str, results_dir: Path) -> dict:
    path = runner.run_ablation(name, budget="small", results_dir=results_dir, echo=lambda _: None)
    results = json.loads(path.read_text())
    assert path == results_dir / f"{name}.small.json"
    assert path.with_suffix(".md").read_text().count("\n| ") == len(results["arms"]) + 1
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert [arm["name"] for arm in results["arms"]] == [arm.name for arm in runner.load_ablation(name).arms]
    environment = results["environment"]
    assert environment["budget"] == "small" and environment["base_config"] == "configs/tiny.yaml"
    assert environment["packages"]["torch"] and environment["seeds"] == [0] and environment["threads"] == [1]
    assert results["command"] == f"puzzle bench {name} --budget small --results-dir {results_dir}"
    return {arm["name"]: arm for arm in results["arms"]}


def assert_evaluated(arm: dict) -> None:
    """An arm that ran through: its child's speedups and every evaluator's numbers, assembled and after GKD."""
    assert arm["status"] == "ok", arm["error"]
    metrics = arm["metrics"]
    budget = (arm["overlay"].get("search") or {}).get("speedup", 1.5)  # the arm's, else the small budget's
    assert metrics["predicted_speedup"] >= budget - 1e-6
    assert metrics["measured_speedup"] > 0
    for phase in ("assembled", "after_gkd"):
        numbers = metrics[phase]
        assert numbers["kl_to_parent"] >= 0 and numbers["throughput_tok_s"] > 0
        for task in ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq", "mmlu_heldout"):
            assert numbers[f"{task}.samples"] == 8  # the small budget's default_limit
    for key in ("accuracy_preserved_before_gkd", "accuracy_preserved"):
        assert metrics[key].keys() == {"value", "low", "high"}
    assert arm["parent"]["eval"]["kl_to_parent"] == 0
    assert len(arm["parent"]["accuracy"]) == 7
    assert len(arm["config_hash"]) == 16 and set(arm["stage_hashes"]) == set(arm["stages"])


def test_search_mip_is_never_worse_than_greedy_or_max_params(results_dir):
    arms = run("search", results_dir)
    for arm in arms.values():
        assert_evaluated(arm)
        assert arm["child"]["solver"] == arm["name"].split("-")[0]
    assert all(arm["stages"][stage] == "reused" for arm in list(arms.values())[1:] for stage in UPSTREAM)
    for budget in ("1.25x", "1.5x", "2x"):
        mip, greedy, max_params = (arms[f"{n}-{budget}"]["child"]["objective_value"] for n in ("mip", "greedy", "max_params"))
        assert mip <= greedy + 1e-12 and mip < max_params
    for shared in ("models/parent.json", "items/parent/hellaswag.json"):
        copies = {(Path(arm["run_dir"]) / "eval" / shared).stat().st_ino for arm in arms.values()}
        assert len(copies) == 1, f"the parent is evaluated once and eval/{shared} linked into the other arms"


def test_baselines_layer_dropping_is_worse_and_uniform_width_cannot_reach_the_budget_on_the_tiny_model(results_dir):
    arms = run("baselines", results_dir)
    assert set(arms["puzzle-1.5x"]["stages"].values()) == {"reused"}, "the same arm as search/mip-1.5x"
    assert_evaluated(arms["layer_drop-1.5x"])
    kl = {name: arms[name]["child"]["objective_value"] for name in ("puzzle-1.5x", "layer_drop-1.5x")}
    assert kl["puzzle-1.5x"] < kl["layer_drop-1.5x"]
    assert any(block == "attn_noop+ffn_noop" for block in arms["layer_drop-1.5x"]["child"]["blocks"])
    # Under the H100 roofline the tiny model is latency-bound: narrower FFNs save no time.
    assert arms["uniform_width-1.5x"]["status"] == "infeasible"
    assert "no FFN width offered in every layer" in arms["uniform_width-1.5x"]["error"]


def test_scoring_arms_share_one_library_and_one_score_table(results_dir):
    arms = run("scoring", results_dir)
    for arm in arms.values():
        assert_evaluated(arm)
    assert arms["kl"]["stages"]["library"] == "reused" and arms["kl"]["stages"]["score"] == "ran"
    for name in ("lm_loss", "cosine", "half_mmlu"):
        assert all(arms[name]["stages"][stage] == "reused" for stage in UPSTREAM)
        assert arms[name]["child"]["objective"] == f"metrics.{name}"
    scores = json.loads((Path(arms["kl"]["run_dir"]) / "scores" / "scores.json").read_text())
    assert set(scores["layer_0"]["attn_noop+ffn_noop"]) == {"kl", "lm_loss", "cosine", "half_mmlu"}


def test_search_space_smaller_libraries_reuse_the_full_ones_blocks(results_dir):
    arms = run("search_space", results_dir)
    assert set(arms["full"]["stages"].values()) == {"reused"}
    assert_evaluated(arms["noop_only"])
    for block in arms["noop_only"]["child"]["blocks"]:
        spec = BlockSpec.parse(block)
        assert spec.attention.kind in ("attention", "no_op") and spec.ffn.kind in ("ffn", "no_op")
        assert spec.attention.no_op or spec.attention.id == "attn_g2"  # the tiny parent's attention
    index = json.loads((Path(arms["ffn_only"]["run_dir"]) / "library" / "index.json").read_text())
    trained = [record for layer in index["layers"] for record in layer["trained"].values()]
    assert trained and all("ffn_" in key for layer in index["layers"] for key in layer["trained"])
    assert arms["ffn_only"]["status"] == "infeasible"  # FFN width buys no time on the tiny model (see baselines)


def test_gkd_loss_arms_share_the_child_and_differ_only_in_uptraining(results_dir):
    arms = run("gkd_losses", results_dir)
    assert set(arms["cosine+kl"]["stages"].values()) == {"reused"}
    for name, arm in arms.items():
        assert_evaluated(arm)
        assert arm["child"]["blocks"] == arms["cosine+kl"]["child"]["blocks"]
        if name != "cosine+kl":
            assert [arm["stages"][s] for s in ("library", "score", "cost", "search", "assemble", "gkd")] == \
                ["reused"] * 5 + ["ran"]
    finals = {name: arm["metrics"]["after_gkd"]["kl_to_parent"] for name, arm in arms.items()}
    assert len(set(finals.values())) > 1


def test_bld_coupled_arm_trains_pairs_on_the_decoupled_arms_subspace(results_dir):
    arms = run("bld", results_dir)
    for arm in arms.values():
        assert_evaluated(arm)
    decoupled, coupled = (Path(arms[n]["run_dir"]) for n in ("decoupled", "coupled"))
    assert json.loads((coupled / "library" / "index.json").read_text())["mode"] == "coupled"
    chosen = [json.loads((decoupled / "solutions" / f).read_text())["chosen"] for f in ("mip.json", "mip_1.json")]
    offered = json.loads((coupled / "library" / "index.json").read_text())["layers"][0]["blocks"]
    assert {c["layer_0"] for c in chosen} <= set(offered)
    tokens = {name: json.loads((Path(arms[name]["run_dir"]) / "library" / "index.json").read_text())["train_tokens"]
              for name in ("tokens_x0.25", "decoupled", "tokens_x4")}
    assert tokens["tokens_x0.25"] < tokens["decoupled"] < tokens["tokens_x4"]


def test_rerunning_an_ablation_reuses_every_finished_arm(results_dir):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "search", "--budget", "small", "--results-dir", str(results_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| max_params-2x | max_params |" in done.stdout
    results = json.loads((results_dir / "search.small.json").read_text())
    assert {arm["name"]: set(arm["stages"].values()) for arm in results["arms"]} == \
        {f"{name}-{budget}": {"skipped"} for budget in ("1.25x", "1.5x", "2x") for name in ("mip", "greedy", "max_params")}
