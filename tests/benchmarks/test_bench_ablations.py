"""Every shipped ablation end to end at ``--budget small`` (the tiny config), sharing one results folder.

Marked slow: together they run each arm's search, assembly, GKD and evaluation (lm_eval
included) and take a few minutes on two CPU cores. They run in order, so later ablations
reuse the Puzzle reference arm and the library that earlier ones finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from benchmarks import runner
from puzzle_core.blocks import BlockSpec
from puzzle_core.corpus import load_corpus
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.schema import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ("library", "score", "cost")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def run(name: str, results_dir: Path) -> dict:
    path = runner.run_ablation(name, budget="small", results_dir=results_dir, echo=lambda _: None, allow_dirty=True)
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


def independent_kl(child_folder: Path, parent_folder: Path, batches: list) -> float:
    """KL(parent || child) per token with transformers alone: the child from its exported folder (its own code)."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
              for folder in (child_folder, parent_folder)]
    total = tokens = 0.0
    with torch.no_grad():
        for ids in batches:
            child, parent = (torch.log_softmax(model(input_ids=ids).logits.float(), -1) for model in models)
            total += float((parent.exp() * (parent - child)).sum())
            tokens += ids.numel()
    return total / tokens


def test_search_at_three_budgets_ranks_arms_as_an_independent_evaluation_does(results_dir):
    """The runner's KL for every arm's child equals one computed here from the exported folders, so its ranking of
    the arms is right; and within each solver, a larger budget gives a faster child."""
    arms = run("search", results_dir)
    for arm in arms.values():
        assert_evaluated(arm)
        assert arm["child"]["solver"] == arm["name"].split("-")[0]
    assert all(arm["stages"][stage] == "reused" for arm in list(arms.values())[1:] for stage in UPSTREAM)
    config = load_config(ROOT / "configs" / "tiny.yaml")
    _, parent = load_parent(config.parent, get_registries())
    corpus = load_corpus(config.data, parent.tokenizer, config.seed, get_registries())
    batches = list(corpus.batches("test", 32, 4, 1024, config.seed))  # the small budget's kl_to_parent tokens
    runner_kl, our_kl = {}, {}
    for name, arm in arms.items():
        folder = ROOT / arm["run_dir"] / "children" / arm["child"]["name"]
        our_kl[name] = independent_kl(folder, Path(parent.source), batches)
        runner_kl[name] = arm["metrics"]["assembled"]["kl_to_parent"]
    assert runner_kl == pytest.approx(our_kl, rel=1e-4, abs=1e-7)
    assert sorted(runner_kl, key=runner_kl.get) == sorted(our_kl, key=our_kl.get)
    assert len(set(our_kl.values())) > 3, "the arms' children differ"
    for solver in ("mip", "greedy", "max_params"):
        predicted = [arms[f"{solver}-{b}"]["metrics"]["predicted_speedup"] for b in ("1.25x", "1.5x", "2x")]
        assert predicted == sorted(predicted) and predicted[0] < predicted[-1]
    assert (results_dir / "search.small.frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_baselines_reuse_the_search_arms_and_uniform_width_cannot_reach_the_budget_on_the_tiny_model(results_dir):
    arms = run("baselines", results_dir)
    for budget in ("1.25x", "1.5x", "2x"):
        assert set(arms[f"puzzle-{budget}"]["stages"].values()) == {"reused"}, f"the same arm as search/mip-{budget}"
        assert_evaluated(arms[f"layer_drop-{budget}"])
        assert any(block == "attn_noop+ffn_noop" for block in arms[f"layer_drop-{budget}"]["child"]["blocks"])
        # Under the H100 roofline the tiny model is latency-bound: narrower FFNs save no time.
        assert arms[f"uniform_width-{budget}"]["status"] == "infeasible"
        assert "no FFN width offered in every layer" in arms[f"uniform_width-{budget}"]["error"]
        stages = arms[f"uniform_width-{budget}"]["stages"]  # what was done before the search failed is kept
        assert [stages[stage] for stage in UPSTREAM] == ["reused"] * 3 and stages["search"] == "not run"
    versus = json.loads((results_dir / "baselines.small.json").read_text())["comparison"]["accuracy_vs_reference"]
    assert versus["puzzle-1.5x"]["difference"]["value"] == 0 and versus["uniform_width-1.5x"] is None
    assert versus["layer_drop-1.5x"]["items"] > 0


def test_frontier_uptrains_the_baselines_children_and_adds_a_budget_between_them(results_dir):
    """The small budget already uptrains each arm's child, so the frontier's arms at the baselines' budgets are those
    arms; only the 1.75x arms run, and their children sit between the 1.5x and 2x ones."""
    arms = run("frontier", results_dir)
    for budget in ("1.25x", "1.5x", "2x"):
        for method in ("puzzle", "layer_drop"):
            assert set(arms[f"{method}-{budget}"]["stages"].values()) == {"reused"}, f"baselines/{method}-{budget}"
    for method in ("puzzle", "layer_drop"):
        assert_evaluated(arms[f"{method}-1.75x"])
        assert arms[f"{method}-1.75x"]["stages"]["search"] == "ran"
        predicted = [arms[f"{method}-{b}"]["metrics"]["predicted_speedup"] for b in ("1.5x", "1.75x", "2x")]
        assert predicted == sorted(predicted) and 1.75 - 1e-6 <= predicted[1]
    assert (results_dir / "frontier.small.frontier.png").read_bytes()[:4] == b"\x89PNG"
    comparison = json.loads((results_dir / "frontier.small.json").read_text())["comparison"]
    budgets = ["1.25x", "1.5x", "1.75x", "2x"]
    per_budget = [comparison["accuracy_vs_same_budget"][f"layer_drop-{b}"] for b in budgets]
    pooled = comparison["pooled_vs_same_budget"]["layer_drop"]
    assert pooled["budgets"] == budgets and pooled["items"] == sum(found["items"] for found in per_budget)
    if all(found["tasks"] == per_budget[0]["tasks"] for found in per_budget):  # each budget weighs the same
        mean = sum(found["difference"]["value"] for found in per_budget) / len(budgets)
        assert pooled["difference"]["value"] == pytest.approx(mean)
    assert "puzzle" not in comparison["pooled_vs_same_budget"], "the reference method is not compared with itself"


def test_search_text_mix_arms_search_on_their_own_text_and_are_measured_on_the_reference_text(results_dir):
    """The mix arms train a library and score blocks on the mix (the frontier's arms are reused whole), and their KL
    is on evaluation.corpus's test split: equal to one computed here on the synthetic text, not on the mix's."""
    arms = run("search_text", results_dir)
    budgets = ("1.25x", "1.5x", "1.75x", "2x")
    for name in (f"{method}-{budget}" for method in ("puzzle", "layer_drop") for budget in budgets):
        assert set(arms[name]["stages"].values()) == {"reused"}, name
    assert {arms[f"uniform_width-{budget}"]["status"] for budget in budgets} == {"infeasible"}, "as in the frontier"
    first, *others = (arms[f"{method}_mix-{budget}"] for method in ("puzzle", "layer_drop") for budget in budgets)
    assert first["stages"]["library"] == "ran" and first["stages"]["score"] == "ran"
    assert all(arm["stages"][stage] == "reused" for arm in others for stage in UPSTREAM)
    config = load_config(ROOT / "configs" / "tiny.yaml")
    _, parent = load_parent(config.parent, get_registries())
    texts = {name: load_corpus(attrs.evolve(config.data, corpus=corpus), parent.tokenizer, config.seed, get_registries())
             for name, corpus in (("synthetic", "synthetic"), ("mix", {"name": "mix", "corpora": ["synthetic", "knowledge"]}))}
    for name in (f"{method}_mix-{budget}" for method in ("puzzle", "layer_drop") for budget in budgets):
        assert_evaluated(arms[name])
        folder = ROOT / arms[name]["run_dir"] / "children" / arms[name]["child"]["name"]
        kl = {text: independent_kl(folder, Path(parent.source), list(corpus.batches("test", 32, 4, 1024, config.seed)))
              for text, corpus in texts.items()}
        recorded = arms[name]["metrics"]["assembled"]["kl_to_parent"]
        assert recorded == pytest.approx(kl["synthetic"], rel=1e-4)
        assert abs(recorded - kl["synthetic"]) < abs(recorded - kl["mix"]) / 5  # (a tiny random model's KL: ~3e-4)
    comparison = json.loads((results_dir / "search_text.small.json").read_text())["comparison"]
    by_pair = {(pair["method"], pair["against"]): pair for pair in comparison["pairs"]}
    assert set(by_pair) == {(pair.method, pair.against) for pair in runner.load_ablation("search_text").pairs}
    text = by_pair["layer_drop_mix", "layer_drop"]
    assert set(text["per_arm"]) == {f"layer_drop_mix-{budget}" for budget in budgets}
    assert text["pooled"]["budgets"] == list(budgets)
    versus_puzzle = comparison["accuracy_vs_same_budget"]
    for budget in budgets:  # a difference of means over the same tasks: (mix - puzzle) - (layer drop - puzzle)
        expected = (versus_puzzle[f"layer_drop_mix-{budget}"]["difference"]["value"]
                    - versus_puzzle[f"layer_drop-{budget}"]["difference"]["value"])
        assert text["per_arm"][f"layer_drop_mix-{budget}"]["difference"]["value"] == pytest.approx(expected, abs=1e-9)


def test_search_objective_cosine_arms_score_their_own_table_and_search_it(results_dir):
    """The KL arms are search_text's mix arms, reused whole; the cosine arms reuse their library and search a cosine
    score table of their own, one for all four budgets."""
    arms = run("search_objective", results_dir)
    budgets = ("1.25x", "1.5x", "1.75x", "2x")
    assert all(set(arms[f"kl-{budget}"]["stages"].values()) == {"reused"} for budget in budgets)
    first, *others = (arms[f"cosine-{budget}"] for budget in budgets)
    assert first["stages"]["library"] == "reused" and first["stages"]["score"] == "ran"
    assert all(arm["stages"][stage] == "reused" for arm in others for stage in UPSTREAM)
    scores = json.loads((ROOT / first["run_dir"] / "scores" / "scores.json").read_text())
    assert set(scores["layer_0"]["attn_noop+ffn_noop"]) == {"cosine"}
    for budget in budgets:
        assert_evaluated(arms[f"cosine-{budget}"])
        assert arms[f"cosine-{budget}"]["child"]["objective"] == "metrics.cosine"


def test_gkd_uptraining_long_arms_uptrain_the_same_children_eight_times_as_long(results_dir):
    """The short arms are search_text's mix arms, reused whole; the long arms reuse every stage up to the assembled
    child, uptrain it on eight times the tokens, and the two methods are paired after the same uptraining."""
    arms = run("gkd_uptraining", results_dir)
    for method in ("puzzle_mix", "layer_drop_mix"):
        short, long = arms[f"{method}-1.5x"], arms[f"{method}_long-1.5x"]
        assert set(short["stages"].values()) == {"reused"}, f"search_text/{method}-1.5x"
        assert [long["stages"][stage] for stage in (*UPSTREAM, "search", "assemble")] == ["reused"] * 5
        assert long["stages"]["gkd"] == "ran" and long["child"]["blocks"] == short["child"]["blocks"]
        assert_evaluated(long)
        tokens = [json.loads((ROOT / arm["run_dir"] / "gkd" / arm["child"]["name"] / "result.json").read_text())["tokens"]
                  for arm in (short, long)]
        assert tokens[1] == 8 * tokens[0]
    comparison = json.loads((results_dir / "gkd_uptraining.small.json").read_text())["comparison"]
    by_pair = {(pair["method"], pair["against"]): pair for pair in comparison["pairs"]}
    versus = comparison["accuracy_vs_same_budget"]  # each against puzzle_mix-1.5x, over the same tasks
    expected = (versus["puzzle_mix_long-1.5x"]["difference"]["value"]
                - versus["layer_drop_mix_long-1.5x"]["difference"]["value"])
    found = by_pair["puzzle_mix_long", "layer_drop_mix_long"]["per_arm"]["puzzle_mix_long-1.5x"]
    assert found["difference"]["value"] == pytest.approx(expected, abs=1e-9)


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
    first = json.loads((results_dir / "search.small.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "search", "--budget", "small", "--results-dir", str(results_dir),
         "--allow-dirty"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| max_params-2x | max_params |" in done.stdout
    assert done.stderr.count("finished in") == 0, "nothing ran again"
    again = json.loads((results_dir / "search.small.json").read_text())
    # The arms keep how they were made (stages ran or reused, seconds, commit), not the rerun's skips.
    keep = ("stages", "seconds", "git_commit", "config_hash", "metrics")
    assert [{k: arm[k] for k in keep} for arm in again["arms"]] == [{k: arm[k] for k in keep} for arm in first["arms"]]
