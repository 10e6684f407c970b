"""Stages gkd -> evaluate -> report over a run directory holding two exported children."""

from __future__ import annotations

import json
import shutil

import attrs
import pytest
import torch

from puzzle_core import gkd as gkd_core
from puzzle_core.config import structure, unstructure
from puzzle_core.evaluation import eval_context
from puzzle_core.pipeline import RunContext, stage_hashes
from puzzle_core.rundir import RunDir, atomic_write
from puzzle_core.schema import GKDSection, PuzzleConfig
from puzzle_core.stages import evaluate, gkd, report
from puzzle_core.layout import ChildRecord, read_children, read_eval_results, read_gkd_results, write_children
from test_gkd import CHILD_BLOCKS, make_child, make_setup

SEQ_LEN = 16


@pytest.fixture
def ctx(tmp_path):
    config = structure(
        {
            "threads": 1,
            "data": {"corpus": "synthetic", "seq_len": SEQ_LEN},
            "scenario": {"batch_size": 1, "prefill_len": 8, "decode_len": 4, "dtype": "fp32", "threads": 1},
            "gkd": {"tokens": 1024, "batch_size": 4, "lr": 5e-4, "warmup_fraction": 0.25, "checkpoint_every": 8,
                    "validation_tokens": 256,
                    "device": "cpu"},
            "evaluation": {"evaluators": [{"name": "kl_to_parent", "tokens": 256, "seq_len": SEQ_LEN},
                                          {"name": "throughput", "warmup": 0, "repeats": 1}]},
        },
        PuzzleConfig,
    )
    context = RunContext(config, RunDir(tmp_path / "run"))
    family, parent, corpus = make_setup()
    context.__dict__.update(loaded_parent=(family, parent), corpus=corpus)  # instead of loading config.parent
    records = []
    for name, blocks in (("mip", CHILD_BLOCKS), ("greedy", ("attn_g1+ffn_64",) * 4)):
        child = make_child(family, parent, blocks)
        family.export(child, context.run_dir.path("children", name))
        records.append(ChildRecord(name=name, solver=name, blocks=list(blocks), path=f"children/{name}",
                                   params=sum(p.numel() for p in child.model.parameters()), predicted_speedup=1.5))
    write_children(context.run_dir, records)
    return context


def test_gkd_evaluate_report_stages(ctx, monkeypatch):
    run_dir = ctx.run_dir
    ctx.stage = "gkd"
    outputs = gkd.run(ctx)
    results = read_gkd_results(run_dir)
    assert set(results) == {"mip", "greedy"}
    for name, result in results.items():
        assert result.kl_after < result.kl_before, name
        assert result.steps == 1024 // (4 * SEQ_LEN)
        assert not (run_dir.path("gkd", name, "checkpoints")).exists()
    relative = {str(p.relative_to(run_dir.root)) for p in outputs}
    assert {"gkd/index.json", "gkd/mip/result.json", "gkd/mip/log.json", "gkd/mip/final/config.json"} <= relative

    # the exported child is the trained one: same validation KL when loaded back
    trained = ctx.family.load_child(run_dir.path("gkd", "mip", "final"))
    batches = list(ctx.corpus.batches("validation", SEQ_LEN, 4, 256, ctx.config.seed))
    kl = gkd_core.validation_kl(gkd_core.LayerwiseForward(trained.model, ctx.family),
                                 gkd_core.LayerwiseForward(ctx.parent.model, ctx.family), batches,
                                 torch.device("cpu"), gkd_core.nullcontext)
    assert kl == pytest.approx(results["mip"].kl_after, rel=1e-5)

    # a second run finds every child done and trains nothing
    monkeypatch.setattr(gkd, "distill", lambda *a, **k: pytest.fail("retrained a finished child"))
    assert {str(p.relative_to(run_dir.root)) for p in gkd.run(ctx)} == relative

    ctx.stage = "evaluate"
    from puzzle_plugins.model_metrics import Throughput

    timed = []
    measure = Throughput.evaluate

    def spy(self, model, context):
        timed.append(model.source)
        return measure(self, model, context)

    monkeypatch.setattr(Throughput, "evaluate", spy)
    evaluate.run(ctx)
    evaluations = read_eval_results(run_dir).models
    assert set(evaluations) == {"parent", "mip", "mip+gkd", "greedy", "greedy+gkd"}
    # GKD changed weights, not the architecture: throughput is timed for the parent and the assembled children only
    assert len(timed) == 3
    for name in ("mip", "greedy"):
        after, assembled = evaluations[name + "+gkd"], evaluations[name]
        assert after.reused == {"throughput": name} and assembled.reused == {}
        assert {k: after.metrics[k] for k in assembled.metrics if "throughput" in k or "speedup" in k} == {
            k: v for k, v in assembled.metrics.items() if "throughput" in k or "speedup" in k}
        assert after.metrics["kl_to_parent"] != assembled.metrics["kl_to_parent"]  # measured again
    assert evaluations["parent"].metrics["kl_to_parent"] == pytest.approx(0.0, abs=1e-6)
    assert evaluations["mip+gkd"].metrics["kl_to_parent"] < evaluations["mip"].metrics["kl_to_parent"]
    assert evaluations["mip+gkd"].path == "gkd/mip/final" and evaluations["mip"].phase == "assembled"
    assert all(e.metrics["throughput_tok_s"] > 0 for e in evaluations.values())

    ctx.stage = "report"
    names = {p.name for p in report.run(ctx)}
    assert {"summary.json", "report.md", "frontier.png", "layer_map.png", "gkd.png"} <= names
    summary = json.loads(run_dir.path("report", "summary.json").read_text())
    mip = summary["children"][0]
    assert mip["kl_to_parent"] == evaluations["mip+gkd"].metrics["kl_to_parent"]
    assert mip["kl_to_parent_before_gkd"] == evaluations["mip"].metrics["kl_to_parent"]
    assert mip["measured_speedup"] == evaluations["mip"].metrics["measured_speedup"]
    assert summary["parent"]["params"] == sum(p.numel() for p in ctx.parent.model.parameters())


def test_gkd_main_only_and_disabled(ctx):
    ctx.stage = "gkd"
    main_only = structure({"children": "main", "tokens": 256, "batch_size": 4, "device": "cpu"}, GKDSection)
    ctx.config = attrs.evolve(ctx.config, gkd=main_only)
    gkd.run(ctx)
    assert set(read_gkd_results(ctx.run_dir)) == {"mip"}
    ctx.config = attrs.evolve(ctx.config, gkd=attrs.evolve(main_only, enabled=False))
    assert [p.name for p in gkd.run(ctx)] == ["index.json"]
    assert read_gkd_results(ctx.run_dir) == {}


def test_gkd_corpus_is_the_text_distilled_on_and_data_corpus_stays_the_runs(ctx, tmp_path, monkeypatch):
    text = tmp_path / "distil.txt"
    text.write_text("\n\n".join(f"zebra {i} quokka {i * 7} narwhal." * 20 for i in range(60)))
    seen = []

    class Stop(Exception):
        pass

    def spy(student, parent, family, objective, section, run):
        seen.append(run)
        raise Stop  # before training

    monkeypatch.setattr(gkd, "distill", spy)
    ctx.stage = "gkd"
    for corpus in (None, str(text)):
        ctx.config = attrs.evolve(ctx.config, gkd=structure({**unstructure(ctx.config.gkd), "corpus": corpus}, GKDSection))
        with pytest.raises(Stop):
            gkd.uptrain_child(ctx, read_children(ctx.run_dir)[0])
    default, own = seen
    assert default.corpus is ctx.corpus and own.corpus.name == str(text)
    assert "quokka" in ctx.tokenizer.decode(own.corpus.tokens("train")[:400].tolist())
    assert "quokka" not in ctx.tokenizer.decode(ctx.corpus.tokens("train")[:4000].tolist())
    assert own.fingerprint != default.fingerprint  # checkpoints of the other text are not resumed


def test_evaluation_corpus_is_the_text_measured_on_and_unset_leaves_finished_runs_hashes_alone(ctx, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(f"zebra {i} quokka {i * 7} narwhal." * 20 for i in range(60)))
    assert "corpus" not in unstructure(ctx.config)["evaluation"]  # as in the config.yaml of runs made before it
    assert eval_context(ctx).corpus is ctx.corpus
    unset = stage_hashes(ctx.config)
    ctx.config = attrs.evolve(ctx.config, evaluation=attrs.evolve(ctx.config.evaluation, corpus=str(text)))
    pinned = stage_hashes(ctx.config)
    assert [stage for stage in unset if unset[stage] != pinned[stage]] == ["evaluate", "report"]
    measured_on = eval_context(ctx).corpus
    assert measured_on.name == str(text) and "quokka" in ctx.tokenizer.decode(measured_on.tokens("test")[:400].tolist())
    assert ctx.tokenized(ctx.config.distillation_corpus) is ctx.corpus  # GKD and the search keep data.corpus


def test_runs_that_differ_in_gkd_alone_reuse_the_parent_and_assembled_children_evaluations(ctx, tmp_path, monkeypatch):
    for stage in (gkd, evaluate):
        ctx.stage = stage.__name__.rsplit(".", 1)[1]
        stage.run(ctx)
    first = read_eval_results(ctx.run_dir).models
    arm_dir = tmp_path / "arm"
    shutil.copytree(ctx.run_dir.root, arm_dir)  # the same children and GKD outputs, as a donor lends them
    atomic_write(arm_dir / "eval" / "models" / "removed.json", "{}")
    atomic_write(arm_dir / "eval" / "items" / "removed" / "boolq.json", "{}")

    def arm(**sections) -> RunContext:
        context = RunContext(attrs.evolve(ctx.config, **sections), RunDir(arm_dir))
        context.__dict__.update(loaded_parent=ctx.loaded_parent, corpus=ctx.corpus)
        context.stage = "evaluate"
        return context

    evaluated = []
    evaluate_all = evaluate.evaluate_all

    def spy(model, pairs, context):
        evaluated.append(context.items_dir.name)
        return evaluate_all(model, pairs, context)

    monkeypatch.setattr(evaluate, "evaluate_all", spy)
    evaluate.run(arm(gkd=attrs.evolve(ctx.config.gkd, lr=1e-3)))
    assert evaluated == ["mip+gkd", "greedy+gkd"]
    models = read_eval_results(RunDir(arm_dir)).models
    assert {name: models[name] for name in ("parent", "mip", "greedy")} == {
        name: first[name] for name in ("parent", "mip", "greedy")}
    assert sorted(p.name for p in (arm_dir / "eval" / "models").iterdir()) == sorted(f"{m}.json" for m in first)
    assert not (arm_dir / "eval" / "items" / "removed").exists()

    evaluated.clear()
    evaluate.run(arm(search=attrs.evolve(ctx.config.search, speedup=2.0)))  # other children: only the parent stands
    assert evaluated == ["mip", "mip+gkd", "greedy", "greedy+gkd"]
