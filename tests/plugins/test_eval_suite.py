"""The lm_eval suite on tiny random models: our harness model against lm-eval's, our evaluator against
lm-eval's own command line, and the suite end to end through ``puzzle run``."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from puzzle_core.blocks import BlockSpec
from puzzle_core.cache import cache_root
from puzzle_core.cli import main
from puzzle_core.choices import EvaluatorChoice
from puzzle_core.config import structure
from puzzle_core.evaluation import EvalContext, read_task_items
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.schema import ParentSection
from tests.tiny import tiny_parent

SUITE = ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq", "mmlu_heldout")


def evaluator(**options):
    choice = structure({"name": "lm_eval", **options}, EvaluatorChoice)
    return get_registries().record(choice).create(choice.options)


def requests(tasks: list[str], limit: int, context: EvalContext) -> list:
    """The log-likelihood requests of ``limit`` items of each task, as lm-eval builds them."""
    found = []
    for task, _ in evaluator(tasks=tasks, default_limit=limit).load_tasks(context).values():
        task.build_all_requests(rank=0, world_size=1)
        found += [instance for instance in task.instances if instance.request_type == "loglikelihood"]
    return found


def test_shared_context_log_likelihoods_equal_hflm_on_a_parent_and_a_decilm_child(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from puzzle_plugins.tasks.harness import SharedContextLM

    family, parent = tiny_parent(num_layers=3)
    child = family.build_child(parent, [BlockSpec.parse("attn_noop+ffn_128"), BlockSpec.parse("attn_g4+ffn_noop"),
                                        parent.shape.blocks[2]])
    context = EvalContext(parent=parent, cache_dir=tmp_path)
    # multiple choice with a shared context (ARC, BoolQ) and with one context per answer (Winogrande)
    mixed = requests(["arc_easy", "boolq", "winogrande"], 4, context)
    rolling = [Instance("loglikelihood_rolling", {}, ("the river stone light " * 30,), idx=0)]
    for model in (parent, child):
        ours = SharedContextLM(pretrained=model.model, tokenizer=copy.deepcopy(model.tokenizer), backend="causal",
                               device="cpu", batch_tokens=700)  # several rows, each packing units of several lengths
        theirs = HFLM(pretrained=model.model, tokenizer=copy.deepcopy(model.tokenizer), backend="causal", device="cpu",
                      batch_size=5)
        got, expected = ours.loglikelihood(mixed, disable_tqdm=True), theirs.loglikelihood(mixed, disable_tqdm=True)
        assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
        # float32 sums over up to ~1000 byte tokens: equal up to summation order
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-3, rel=1e-5)
        hflm_reads = sum(min(len(c) + len(k), theirs.max_length + 1) - 1
                         for c, k in (theirs._encode_pair(*r.args) for r in mixed))
        assert ours.tokens_read < 0.8 * hflm_reads  # each shared context read once, not once per answer
        assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
            theirs.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-5)


@pytest.mark.slow  # lm-eval's command line indexes its whole task catalogue first
def test_arc_easy_items_agree_with_lm_evals_own_command_line(tmp_path):
    _, parent = load_parent(ParentSection(source="tiny-random-llama"), get_registries())
    folder = cache_root() / "models" / "tiny-random-llama-v3"  # where the alias made it
    context = EvalContext(parent=parent, cache_dir=tmp_path / "eval", items_dir=tmp_path / "items")
    ours = evaluator(tasks=["arc_easy"], default_limit=12)
    metrics = ours.evaluate(parent, context)
    items = read_task_items(tmp_path / "items")["arc_easy"]
    (rendered,) = (tmp_path / "eval" / "lm_eval_tasks").iterdir()
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
         "--tasks", "arc_easy", "--include_path", str(rendered), "--samples", json.dumps({"arc_easy": items.ids}),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (samples_file,) = out.rglob("samples_arc_easy_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == items.ids
    for metric in ("acc", "acc_norm"):
        assert [float(s[metric]) for s in samples] == items.metrics[metric]
        assert metrics[f"arc_easy.{metric}"] == pytest.approx(sum(items.metrics[metric]) / 12)


def test_the_suite_end_to_end_through_puzzle_run(tmp_path, capsys):
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())
    config["search"]["baselines"] = []
    config["gkd"]["enabled"] = False
    config["evaluation"] = {"evaluators": [{"name": "kl_to_parent", "tokens": 256, "seq_len": 32},
                                           {"name": "lm_eval", "default_limit": 3, "limit": {"boolq": 2}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == 0, capsys.readouterr().err

    parent, child = (read_task_items(run_dir / "eval" / "items" / model) for model in ("parent", "mip"))
    assert set(parent) == set(child) == set(SUITE)
    for task in SUITE:
        assert parent[task].ids == child[task].ids and len(parent[task].ids) == (2 if task == "boolq" else 3)
        assert parent[task].fingerprint == child[task].fingerprint
        assert parent[task].tokens > 0 and parent[task].seconds > 0
    assert parent["winogrande"].chance == [0.5] * 3 and parent["hellaswag"].chance == [0.25] * 3
    assert set(parent["hellaswag"].metrics) == {"acc", "acc_norm"} and set(parent["boolq"].metrics) == {"acc"}
    results = json.loads((run_dir / "eval" / "results.json").read_text())["models"]
    assert results["parent"]["metrics"]["hellaswag.samples"] == 3
    assert results["mip"]["metrics"]["hellaswag.acc"] == pytest.approx(sum(child["hellaswag"].metrics["acc"]) / 3)

    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    accuracy = summary["children"][0]["accuracy"]
    assert set(accuracy["tasks"]) == set(SUITE) and accuracy["mean"]["items"] == 20
    assert summary["children"][0]["accuracy_preserved"] == accuracy["mean"]["preserved"]
    assert set(summary["parent"]["accuracy"]) == set(SUITE)
    report = (run_dir / "report" / "report.md").read_text()
    assert "### `mip` as assembled" in report and "| **mean of 7 tasks** |" in report

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "eval/items/mip/hellaswag.json" in json.dumps(manifest)  # checksummed like every output
    assert main(["run", str(path), "--run-dir", str(run_dir), "--resume"]) == 0
    assert "[7/8] evaluate: evaluating parent and children (done, skipped)" in capsys.readouterr().out


def test_item_subsets_are_seeded_nested_and_cover_everything_at_full():
    from puzzle_plugins.tasks.evaluator import item_subset

    small, large = item_subset("hellaswag", 10_042, 50, 0), item_subset("hellaswag", 10_042, 400, 0)
    assert len(small) == 50 and len(large) == 400 and set(small) < set(large) and small == sorted(small)
    assert item_subset("hellaswag", 10_042, 50, 0) == small  # the same items for every model and run
    assert item_subset("hellaswag", 10_042, 50, 1) != small and item_subset("boolq", 10_042, 50, 0) != small
    assert item_subset("boolq", 30, "full", 0) == item_subset("boolq", 30, 99, 0) == list(range(30))
