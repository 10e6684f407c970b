"""Evaluators on the tiny random Llama: lm-eval tasks offline, KL to the parent, throughput."""

from __future__ import annotations

import copy
import json
import math
import random

import attrs
import pytest
import torch

from puzzle_core.choices import EvaluatorChoice
from puzzle_core.config import structure
from puzzle_core.corpus import load_corpus
from puzzle_core.errors import ConfigError
from puzzle_core.evaluation import evaluate_all
from puzzle_core.interfaces import EvalContext, LoadedModel
from puzzle_core.registry import get_registries
from puzzle_core.schema import DataSection, ParentSection, Scenario
from puzzle_plugins.tasks.mmlu import Question, choice_loglikelihoods, load_mmlu


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """PUZZLE_CACHE, the tiny-random-llama parent, a small corpus and an MMLU-format fixture."""
    root = tmp_path_factory.mktemp("evaluators")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PUZZLE_CACHE", str(root / "cache"))
        from puzzle_core.parents import load_parent
        from puzzle_core.registry import get_registries

        _, parent = load_parent(ParentSection(source="tiny-random-llama"), get_registries())
        rng = random.Random(0)
        words = "the river stone light house quiet morning garden letter road".split()
        text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(40))
        (root / "book.txt").write_text(text)
        corpus = load_corpus(DataSection(corpus=str(root / "book.txt"), test_fraction=0.4), parent.tokenizer)
        subjects = ["astronomy", "law", "music", "geology", "poetry", "chess"]
        mmlu = root / "mmlu.jsonl"
        with mmlu.open("w") as handle:
            for s, subject in enumerate(subjects):
                for i in range(3):
                    choices = [f"{subject} answer {k}{' longer' * ((i + k) % 3)}" for k in range(4)]
                    question = Question(f"Which {subject} fact {i} holds?", choices, (s + i) % 4, subject)
                    handle.write(json.dumps(question.to_json()) + "\n")
        yield {"root": root, "parent": parent, "corpus": corpus, "mmlu": mmlu}


@pytest.fixture
def context(workspace, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE", str(workspace["root"] / "cache"))
    return EvalContext(
        parent=workspace["parent"],
        corpus=workspace["corpus"],
        scenario=Scenario(batch_size=2, prefill_len=16, decode_len=4, dtype="fp32", threads=1),
        threads=1,
        seed=0,
        cache_dir=workspace["root"] / "eval-cache",
    )


def evaluator(name: str, **options):
    choice = structure({"name": name, **options}, EvaluatorChoice)
    return get_registries().record(choice).create(choice.options)


def test_lm_eval_builtin_tasks(workspace, context):
    lm_eval = evaluator("lm_eval", tasks=["mmlu_heldout", "heldout_perplexity"], mmlu_file=str(workspace["mmlu"]),
                        limit={"heldout_perplexity": 3}, batch_tokens=64)
    metrics = lm_eval.evaluate(workspace["parent"], context)
    # the harness's accuracy equals our own answer-text scoring on the same held-out half
    questions = load_mmlu("eval", path=workspace["mmlu"])
    assert metrics["mmlu_heldout.samples"] == len(questions) == 9
    direct = choice_loglikelihoods(workspace["parent"].model, workspace["parent"].tokenizer, questions, progress=False)
    assert metrics["mmlu_heldout.acc"] == pytest.approx(direct.acc)
    assert metrics["mmlu_heldout.acc_norm"] == pytest.approx(direct.acc_norm)
    assert "mmlu_heldout.acc_stderr" in metrics
    # an untrained model over 260 byte tokens is close to uniform: about log2(260) = 8 bits per byte
    assert metrics["heldout_perplexity.samples"] == 3
    assert 6.0 < metrics["heldout_perplexity.bits_per_byte"] < 10.0
    assert metrics["heldout_perplexity.word_perplexity"] > metrics["heldout_perplexity.byte_perplexity"] > 1.0
    assert workspace["parent"].model.training is False


def test_lm_eval_accepts_a_plain_module_with_the_hf_signature(workspace, context):
    parent = workspace["parent"]

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    plain = attrs.evolve(parent, model=Plain(parent.model))
    lm_eval = evaluator("lm_eval", tasks=["mmlu_heldout"], mmlu_file=str(workspace["mmlu"]))
    ours = lm_eval.evaluate(plain, context)
    questions = load_mmlu("eval", path=workspace["mmlu"])
    assert ours["mmlu_heldout.acc_norm"] == pytest.approx(
        choice_loglikelihoods(parent.model, parent.tokenizer, questions, progress=False).acc_norm
    )


def test_lm_eval_user_task_by_yaml_path_and_unknown_names(workspace, context, tmp_path):
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in workspace["corpus"].documents("test")[:2]))
    task = tmp_path / "my_ppl.yaml"
    task.write_text(
        "task: my_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + json.dumps(str(data)) + "\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n"
    )
    metrics = evaluator("lm_eval", tasks=[str(task)]).evaluate(workspace["parent"], context)
    assert set(metrics) == {"my_ppl.bits_per_byte", "my_ppl.samples"} and metrics["my_ppl.samples"] == 2
    by_name = evaluator("lm_eval", tasks=["my_ppl"], include_path=[str(tmp_path)], limit={"my_ppl": 1})
    assert by_name.evaluate(workspace["parent"], context)["my_ppl.samples"] == 1
    with pytest.raises(ConfigError, match="Unknown lm_eval task 'my_pl'. Did you mean 'my_ppl'.*include_defaults"):
        evaluator("lm_eval", tasks=["my_pl"], include_path=[str(tmp_path)])
    with pytest.raises(ConfigError, match="include_path 'nowhere' does not exist"):
        evaluator("lm_eval", include_path=["nowhere"])


def test_builtin_prompt_matches_the_scoring_prompt(tmp_path):
    import yaml
    from jinja2 import Template

    from puzzle_plugins.tasks.evaluator import render_template
    from puzzle_plugins.tasks.mmlu import mmlu_prompt

    config = yaml.safe_load(render_template("mmlu_heldout", tmp_path / "x.jsonl", tmp_path / "datasets"))
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "x.jsonl").resolve())
    question = Question("  What is 2+2? ", ("3", "4"), 1, "arithmetic")
    assert Template(config["doc_to_text"]).render(**question.to_json()) == mmlu_prompt(question)


def test_kl_to_parent(workspace, context):
    parent = workspace["parent"]
    kl = evaluator("kl_to_parent", tokens=512, seq_len=64, batch_size=4)
    same = kl.evaluate(parent, context)
    assert abs(same["kl_to_parent"]) < 1e-6
    assert same["test_lm_loss"] == pytest.approx(math.log(len(parent.tokenizer)), rel=0.05)
    noisy = copy.deepcopy(parent.model)
    with torch.no_grad():
        noisy.lm_head.weight.add_(torch.randn_like(noisy.lm_head.weight), alpha=0.5)
    changed = kl.evaluate(LoadedModel(noisy, parent.tokenizer, parent.shape, "noisy"), context)
    assert changed["kl_to_parent"] > 1e-3


def test_throughput(workspace, context):
    metrics = evaluator("throughput", warmup=1, repeats=2).evaluate(workspace["parent"], context)
    assert metrics["throughput_tok_s"] > 0
    assert metrics["throughput_tok_s"] == pytest.approx(2 * 4 / metrics["latency_s"])
    assert 0 < metrics["prefill_s"] < metrics["latency_s"]
    assert metrics["measured_speedup_rounds"] == 2  # the parent against itself: the measurement's own noise
    assert metrics["measured_speedup_min"] <= metrics["measured_speedup"] <= metrics["measured_speedup_max"]
    alone = evaluator("throughput", repeats=1).evaluate(workspace["parent"], attrs.evolve(context, parent=None))
    assert "measured_speedup" not in alone and alone["throughput_tok_s"] > 0
    bf16 = attrs.evolve(context, scenario=attrs.evolve(context.scenario, dtype="bf16"))
    assert evaluator("throughput", warmup=0, repeats=2, statistic="min").evaluate(workspace["parent"], bf16)["throughput_tok_s"] > 0
    assert next(workspace["parent"].model.parameters()).dtype == torch.float32  # measured on a copy


def test_throughput_times_weights_read_in_place_from_a_copy_of_their_own(workspace, context, tmp_path):
    from transformers import AutoModelForCausalLM

    from puzzle_core.timing import owns_weights

    parent = workspace["parent"]
    parent.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not owns_weights(loaded)  # from_pretrained leaves them in the memory-mapped checkpoint
    timed: list[bool] = []
    loaded.register_forward_hook(lambda module, _args, _output: timed.append(owns_weights(module)))
    in_place = LoadedModel(loaded, parent.tokenizer, parent.shape, "in place")
    evaluator("throughput", warmup=0, repeats=1).evaluate(in_place, attrs.evolve(context, parent=in_place))
    assert timed and all(timed)  # the model and the parent: both ran from weights of their own
    assert not owns_weights(loaded)  # the caller's model is left as it was


class FakeClock:
    """Time that passes only while models run: ``cost`` units per forward call, times ``slowdown``,
    which grows by 1.7x after every ``round_calls`` forward calls (a machine whose speed keeps changing)."""

    def __init__(self, round_calls: int):
        self.time = 0.0
        self.slowdown = 1.0
        self.round_calls = round_calls
        self.calls: list[str] = []

    def now(self) -> float:
        return self.time

    def charge(self, name: str, cost: float):
        def hook(_module, _args, _output):
            self.time += cost * self.slowdown
            self.calls.append(name)
            if len(self.calls) % self.round_calls == 0:
                self.slowdown *= 1.7
        return hook


def test_throughput_pairs_the_model_with_the_parent_round_by_round(workspace, context, monkeypatch):
    import puzzle_core.timing as timing

    decode = context.scenario.decode_len  # forward calls per generate(): the prefill, then decode - 1 steps
    clock = FakeClock(round_calls=2 * decode)
    monkeypatch.setitem(timing.CLOCKS, "wall", clock.now)
    parent = workspace["parent"]
    child = copy.deepcopy(parent.model)
    hooks = [parent.model.register_forward_hook(clock.charge("parent", 3.0)),
             child.register_forward_hook(clock.charge("child", 2.0))]
    try:
        metrics = evaluator("throughput", warmup=1, repeats=5).evaluate(
            LoadedModel(child, parent.tokenizer, parent.shape, "child"), context)
    finally:
        for hook in hooks:
            hook.remove()
    # a warm-up round, then 5 timed rounds; each runs both models, the order reversing every round
    assert clock.calls[::decode] == ["child", "parent", "parent", "child"] * 3
    # times grew 1.7x per round (14x in all); the per-round ratio did not move
    assert metrics["measured_speedup"] == pytest.approx(1.5)
    for end in ("q1", "q3", "min", "max"):
        assert metrics[f"measured_speedup_{end}"] == pytest.approx(1.5)
    assert metrics["measured_speedup_rounds"] == 5
    # absolute numbers: the median round (the third timed one, slowdown 1.7^3)
    assert metrics["latency_s"] == pytest.approx(2.0 * decode * 1.7**3)
    assert metrics["prefill_s"] == pytest.approx(2.0 * 1.7**3)
    assert metrics["parent_throughput_tok_s"] == pytest.approx(2 * decode / (3.0 * decode * 1.7**3))


def test_evaluate_all_merges_and_rejects_clashes(workspace, context):
    kl = evaluator("kl_to_parent", tokens=128, seq_len=64)
    merged = evaluate_all(workspace["parent"], [("kl", kl), ("speed", evaluator("throughput", repeats=1))], context)
    assert {"kl_to_parent", "test_lm_loss", "throughput_tok_s", "latency_s", "prefill_s", "parent_throughput_tok_s",
            "measured_speedup", "measured_speedup_q1", "measured_speedup_q3", "measured_speedup_min",
            "measured_speedup_max", "measured_speedup_rounds"} == set(merged)
    with pytest.raises(ValueError, match="both report 'kl_to_parent'"):
        evaluate_all(workspace["parent"], [("a", kl), ("b", kl)], context)


def test_evaluators_are_registered(registries):
    assert {"lm_eval", "kl_to_parent", "throughput"} <= set(registries.evaluators.names())
    with pytest.raises(Exception, match="batch_size"):
        structure({"name": "lm_eval", "batch_size": 0}, EvaluatorChoice)
