"""The report renders from a hand-made run directory; its numbers follow from the inputs."""

from __future__ import annotations

import json
import shutil

import attrs
import pytest

from puzzle_core.evaluation import TaskItems, write_task_items
from puzzle_core.report import build_summary, layer_map, paired_accuracy
from puzzle_core.rundir import RunDir
from puzzle_core.stages.report import write_report

PARENT_BLOCK = "attn_g1+ffn_128"
ATTENTION = {"attn_g1": 3.0, "attn_g2": 2.0, "attn_linear": 0.5, "attn_noop": 0.0}
FFN = {"ffn_128": 4.0, "ffn_64": 2.0, "ffn_noop": 0.0}
CHILDREN = {
    "mip": ["attn_g1+ffn_128", "attn_g2+ffn_64", "attn_linear+ffn_128", "attn_noop+ffn_64"],
    "greedy": ["attn_g1+ffn_64", "attn_g2+ffn_128", "attn_g2+ffn_64", "attn_noop+ffn_noop"],
    "max_params": ["attn_g1+ffn_128", "attn_g1+ffn_128", "attn_noop+ffn_64", "attn_noop+ffn_noop"],
}


def write(run_dir: RunDir, relative: str, data) -> None:
    path = run_dir.path(relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def metrics(kl, throughput, perplexity):
    return {"kl_to_parent": kl, "throughput_tok_s": throughput, "mmlu_heldout.acc_norm": 0.5, "mmlu_heldout.samples": 10,
            "heldout_perplexity.word_perplexity": perplexity}


# per model: correct answers among 10 items of a 4-choice task (acc_norm; acc is its opposite) and of a 2-choice one
CORRECT = {"parent": (6, 8), "mip": (4, 6), "mip+gkd": (5, 8), "greedy": (3, 5), "max_params": (2, 4)}


def items(task: str, correct: int, chance: float, metric: str) -> TaskItems:
    hits = [1.0] * correct + [0.0] * (10 - correct)
    scores = {metric: hits} if metric == "acc" else {"acc": [1.0 - h for h in hits], "acc_norm": hits}
    return TaskItems(task=task, ids=list(range(10)), metrics=scores, chance=[chance] * 10, fingerprint="f" + task)


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    """Every artifact the report reads, small and hand-made; runtimes add up per sub-block."""
    run_dir = RunDir(tmp_path / "run")
    blocks = [f"{a}+{f}" for a in ATTENTION for f in FFN]
    blocks.remove(PARENT_BLOCK)
    write(run_dir, "library/index.json", {"layers": [{"blocks": [PARENT_BLOCK, *blocks]} for _ in range(4)]})
    runtime = {b: ATTENTION[b.split("+")[0]] + FFN[b.split("+")[1]] for b in [PARENT_BLOCK, *blocks]}
    write(run_dir, "costs/costs.json", {
        "cost_model": "h100", "scenario": {"batch_size": 1},
        "fixed": {"runtime_ms": 1.0},
        "layers": {f"layer_{i}": {b: {"runtime_ms": r} for b, r in runtime.items()} for i in range(4)},
    })
    write(run_dir, "solutions/index.json", {"solutions": [
        {"name": "mip", "file": "mip.json", "solver": "mip", "main": True},
        {"name": "greedy", "file": "greedy.json", "solver": "greedy", "main": False},
        {"name": "max_params", "file": "max_params.json", "solver": "max_params", "main": False},
    ]})
    write(run_dir, "children/index.json", {"children": [
        {"name": name, "solver": name, "blocks": chosen, "path": f"children/{name}", "params": 1_000_000 - 100_000 * i,
         "predicted_speedup": 1.6 + 0.1 * i}
        for i, (name, chosen) in enumerate(CHILDREN.items())
    ]})
    models = {
        "parent": ("parent", None, None, metrics(0.0, 100.0, 20.0)),
        "mip": ("child", "mip", "assembled", metrics(0.50, 160.0, 30.0)),
        "mip+gkd": ("child", "mip", "gkd", metrics(0.20, 162.0, 24.0)),
        "greedy": ("child", "greedy", "assembled", metrics(0.90, 170.0, 40.0)),
        "max_params": ("child", "max_params", "assembled", metrics(1.70, 150.0, 80.0)),
    }
    for model, (four, two) in CORRECT.items():
        write_task_items(run_dir.path("eval", "items", model), items("mmlu_heldout", four, 0.25, "acc_norm"))
        write_task_items(run_dir.path("eval", "items", model), items("arc_local", two, 0.5, "acc"))
    write(run_dir, "eval/results.json", {"evaluators": [{"name": "kl_to_parent"}], "models": {
        key: {"role": role, "child": child, "phase": phase, "path": None, "params": 1_200_000, "metrics": m,
              "seconds": 1.0, "fingerprint": ""}
        for key, (role, child, phase, m) in models.items()
    }})
    write(run_dir, "gkd/index.json", {"children": [
        {"child": "mip", "steps": 3, "tokens": 384, "kl_before": 0.6, "kl_after": 0.25, "lora_rank": 0,
         "train_seconds": 2.0, "tokens_per_second": 192.0, "fingerprint": ""}
    ]})
    write(run_dir, "gkd/mip/log.json", {
        "train": [{"step": s, "tokens": 128 * s, "lr": 1e-4, "loss": 1.0 / s, "terms": {"kl": 0.5 / s}} for s in (1, 2, 3)],
        "validation": [{"step": 0, "tokens": 0, "kl": 0.6}, {"step": 3, "tokens": 384, "kl": 0.25}],
    })
    return run_dir


def test_report_renders_with_summary_keys(run_dir):
    written = write_report(run_dir, {"batch_size": 1, "prefill_len": 32, "decode_len": 8, "device": "cpu"}, "tiny-llama")
    folder = run_dir.path("report")
    assert {p.name for p in written} == {"summary.json", "frontier.png", "layer_map.png", "gkd.png", "report.md"}
    for name in ("frontier.png", "layer_map.png", "gkd.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((folder / "summary.json").read_text())
    assert {"params", "throughput_tok_s", "eval"} <= summary["parent"].keys()
    assert summary["parent"]["throughput_tok_s"] == 100.0 and summary["parent"]["params"] == 1_200_000
    assert summary["scenario"]["prefill_len"] == 32
    keys = {"name", "solver", "params", "predicted_speedup", "measured_speedup", "kl_to_parent", "eval", "accuracy_preserved"}
    assert [c["name"] for c in summary["children"]] == ["mip", "greedy", "max_params"]
    assert all(keys <= c.keys() for c in summary["children"])
    mip, greedy = summary["children"][0], summary["children"][1]
    assert mip["measured_speedup"] == pytest.approx(1.62)  # after GKD's measurement
    assert mip["kl_to_parent"] == 0.20 and mip["kl_to_parent_before_gkd"] == 0.50
    # acc_norm stands for mmlu_heldout, acc for arc_local; perplexity never counts
    assert summary["accuracy_metrics"] == ["arc_local.acc", "mmlu_heldout.acc_norm"]
    assert mip["accuracy_preserved"]["value"] == pytest.approx((5 / 6 + 8 / 8) / 2)  # after GKD
    assert mip["accuracy_preserved_before_gkd"]["value"] == pytest.approx((4 / 6 + 6 / 8) / 2)
    margins = ((0.5 - 0.25) + (0.8 - 0.5)) / ((0.6 - 0.25) + (0.8 - 0.5))
    assert mip["accuracy_preserved_chance_adjusted"]["value"] == pytest.approx(margins)
    arc = mip["accuracy"]["tasks"]["arc_local"]
    assert arc["metric"] == "acc" and arc["items"] == 10 and arc["chance"] == 0.5
    assert arc["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}  # the same answers on every item
    for interval in (mip["accuracy_preserved"], mip["accuracy_preserved_before_gkd"]):
        assert interval["low"] < interval["value"] < interval["high"]
    parent_mmlu = summary["parent"]["accuracy"]["mmlu_heldout"]
    assert parent_mmlu["metric"] == "acc_norm" and parent_mmlu["accuracy"]["value"] == pytest.approx(0.6)
    assert mip["main"] is True and greedy["main"] is False
    assert greedy["gkd"] is None and greedy["kl_to_parent_after_gkd"] is None and greedy["kl_to_parent"] == 0.90
    assert greedy["accuracy_preserved"] == greedy["accuracy_preserved_before_gkd"]

    report = (folder / "report.md").read_text()
    for expected in ("![frontier](frontier.png)", "![layer map](layer_map.png)", "![GKD curves](gkd.png)",
                     "`tiny-llama`", "| `mip` (main) | mip | 1.00M | 1.60x | 1.62x | 0.5 | 0.2 | 91.7% [",
                     "| `greedy` | greedy | 0.90M | 1.70x | 1.70x | 0.9 | – | 56.2% [", "| mip + GKD |",
                     "### `mip` after GKD", "| arc_local (acc, 10 items) | 80.0 | 80.0 | +0.0 [+0.0, +0.0] | 100.0% [",
                     "| mmlu_heldout | acc_norm | 10 | 25.0 | 60.0% ["):
        assert expected in report
    assert "mmlu_heldout.acc_norm |" not in report  # per-task accuracies only in the paired tables


def test_items_pair_only_when_the_same(run_dir):
    parent = {"t": items("t", 6, 0.25, "acc_norm")}
    moved = attrs.evolve(items("t", 6, 0.25, "acc_norm"), ids=list(range(1, 11)))
    assert paired_accuracy(parent, {"t": moved}) is None
    other_data = attrs.evolve(items("t", 6, 0.25, "acc_norm"), fingerprint="different")
    assert paired_accuracy(parent, {"t": other_data, "u": items("u", 1, 0.5, "acc")}) is None
    both = paired_accuracy({**parent, "u": items("u", 2, 0.5, "acc")}, {"t": other_data, "u": items("u", 1, 0.5, "acc")})
    assert list(both["tasks"]) == ["u"] and both["unpaired"] == ["t"]


def test_layer_map_separates_attention_from_ffn_runtime(run_dir):
    rows = layer_map(run_dir, CHILDREN["mip"])
    assert rows[0]["attention"] == {"variant": "attn_g1", "relative_runtime": 1.0}
    assert rows[1]["attention"]["relative_runtime"] == pytest.approx(2.0 / 3.0)
    assert rows[1]["ffn"]["relative_runtime"] == pytest.approx(0.5)
    assert rows[2]["attention"]["relative_runtime"] == pytest.approx(0.5 / 3.0)
    assert rows[3]["attention"] == {"variant": "attn_noop", "relative_runtime": 0.0}


def test_layer_map_falls_back_to_whole_block_runtime(run_dir):
    costs = json.loads(run_dir.path("costs", "costs.json").read_text())
    for layer in costs["layers"].values():  # no no-op partners: sub-blocks cannot be separated
        for block in [b for b in layer if "noop" in b]:
            del layer[block]
    run_dir.path("costs", "costs.json").write_text(json.dumps(costs))
    row = layer_map(run_dir, CHILDREN["mip"])[1]
    assert row["attention"]["relative_runtime"] == row["ffn"]["relative_runtime"] == pytest.approx(4.0 / 7.0)


def test_report_without_gkd_or_evaluation(run_dir):
    for relative in ("gkd/index.json", "eval/results.json"):
        run_dir.path(relative).unlink()
    shutil.rmtree(run_dir.path("eval", "items"))
    summary = build_summary(run_dir)
    assert summary.parent.accuracy == {} and summary.children[0].accuracy is None
    assert summary.parent.throughput_tok_s is None
    assert summary.children[0].measured_speedup is None and summary.children[0].gkd is None
    written = write_report(run_dir, {}, "parent")
    assert "gkd.png" not in {p.name for p in written}
    assert "GKD did not run" in run_dir.path("report", "report.md").read_text()
