"""Replace-1-block scoring: the cached engine and the validation-token scorers on a tiny Llama."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F

from puzzle_core import scoring
from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.errors import UserError
from puzzle_core.interfaces import ScoringBatch
from puzzle_core.scoring import ReplaceOneBlockEngine, ScoringSession, head_statistics, merge_batches, next_token_labels
from puzzle_core.api.decoder import DecoderLayerRunner
from tests.tiny import tiny_parent, token_batch

SCORERS = ("kl", "lm_loss", "cosine")


def scorers(registries):
    return {name: registries.scorers.get(name).create() for name in SCORERS}


def batches(num: int = 3, rows: int = 2, length: int = 16) -> list[ScoringBatch]:
    ids = token_batch(num * rows, length)
    return [ScoringBatch(x, torch.ones_like(x, dtype=torch.bool), next_token_labels(x)) for x in ids.split(rows)]


@pytest.fixture
def setup(registries):
    family, parent = tiny_parent(num_layers=3)
    runner = family.layer_runner(parent.model)
    data = batches()
    engine = ReplaceOneBlockEngine(runner, data, keep_log_probs=True, vocab_size=parent.shape.vocab_size,
                                   max_cache_mib=64, references=scorers(registries), progress=False)
    return family, parent, runner, engine


def variant(family, parent, layer, spec):
    return family.init_sublayer(parent, layer, spec, None, method="default").eval()


def test_parent_block_scores_zero_distance_and_the_parents_own_loss(setup, registries):
    family, parent, runner, engine = setup
    ids = torch.cat([b.input_ids for b in engine.batches])
    with torch.no_grad():
        parent_loss = parent.model(ids, labels=ids).loss.item()  # equal-length rows: mean of means = mean
    for layer in range(runner.num_layers):
        scores = engine.score(layer, runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn"),
                              scorers(registries))
        assert scores["kl"] < 1e-6
        assert scores["cosine"] < 1e-6
        assert scores["lm_loss"] == pytest.approx(parent_loss, abs=1e-5)
    assert engine.reference["lm_loss"] == pytest.approx(parent_loss, abs=1e-5)
    assert engine.reference["kl"] < 1e-6


@pytest.mark.parametrize("part", ["attention", "ffn"])
def test_a_no_op_block_scores_worse_than_the_parent_block(setup, registries, part):
    family, parent, runner, engine = setup
    layer = 1
    attention, ffn = runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn")
    parent_scores = engine.score(layer, attention, ffn, scorers(registries))
    if part == "attention":
        attention = variant(family, parent, layer, AttentionSpec(no_op=True))
    else:
        ffn = variant(family, parent, layer, FFNSpec(no_op=True))
    noop_scores = engine.score(layer, attention, ffn, scorers(registries))
    assert noop_scores["kl"] > parent_scores["kl"] + 1e-6
    assert noop_scores["cosine"] > parent_scores["cosine"] + 1e-6
    assert noop_scores["lm_loss"] != pytest.approx(parent_scores["lm_loss"], abs=1e-6)


class OpaqueHeadRunner(DecoderLayerRunner):
    """A runner whose head can only be called whole (as for a LoRA-wrapped head): the row-chunk path."""

    def head_projection(self):
        return None


@pytest.mark.parametrize("opaque_head", [False, True])
def test_scores_equal_independent_full_forwards_of_the_child(registries, monkeypatch, opaque_head):
    """Engine scores (cached prefix, merged batches, streamed head in several vocabulary slices) against
    full forwards of a child built with the block swapped in, scored with torch's own KL and cross-entropy."""
    monkeypatch.setattr(scoring, "SLICE_ELEMENTS", 1)  # 256-column slices: the 260-token vocabulary takes two
    monkeypatch.setattr(scoring, "ROW_CHUNK", 5)  # row chunks that do not divide the tokens
    family, parent = tiny_parent(num_layers=3)
    runner = OpaqueHeadRunner(parent.model) if opaque_head else family.layer_runner(parent.model)
    data = batches()
    engine = ReplaceOneBlockEngine(runner, data, keep_log_probs=True, vocab_size=parent.shape.vocab_size,
                                   max_cache_mib=64, references=scorers(registries), progress=False)
    assert len(engine.batches) == 1  # the three batches run as one group
    ids = torch.cat([b.input_ids for b in data])
    with torch.no_grad():
        teacher = torch.log_softmax(parent.model(ids).logits, -1)
    for layer in range(runner.num_layers):
        block = BlockSpec(AttentionSpec(n_heads_in_group=4), FFNSpec(intermediate_size=32))
        attention = variant(family, parent, layer, block.attention)
        ffn = variant(family, parent, layer, block.ffn)
        blocks = list(parent.shape.blocks)
        blocks[layer] = block
        child = family.build_child(parent, blocks, {(layer, "attention"): attention.state_dict(),
                                                    (layer, "ffn"): ffn.state_dict()})
        with torch.no_grad():
            logits = child.model(ids).logits
        expected_kl = F.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True, reduction="sum") / ids.numel()
        expected_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        scores = engine.score(layer, attention, ffn, scorers(registries))
        assert scores["kl"] > 1e-3  # a real change, not the parent
        assert scores["kl"] == pytest.approx(float(expected_kl), rel=1e-4, abs=1e-6)
        assert scores["lm_loss"] == pytest.approx(float(expected_loss), rel=1e-5)
        naive = engine.score(layer, attention, ffn, scorers(registries), reuse_prefix=False)
        assert scores["cosine"] == pytest.approx(naive["cosine"], rel=1e-5, abs=1e-7)


def test_head_statistics_equal_full_vocabulary_reductions(monkeypatch):
    monkeypatch.setattr(scoring, "SLICE_ELEMENTS", 1)
    family, parent = tiny_parent(num_layers=1)
    generator = torch.Generator().manual_seed(1)
    hidden, other = torch.randn(2, 2, 7, 64, generator=generator)
    labels = torch.randint(0, 260, (2, 7), generator=generator)
    labels[:, -1] = -100
    for runner in (family.layer_runner(parent.model), OpaqueHeadRunner(parent.model)):
        with torch.no_grad():
            logits = runner.head(hidden)
            teacher = torch.log_softmax(runner.head(other), -1)
            statistics = head_statistics(hidden, runner, teacher, labels)
        torch.testing.assert_close(statistics.log_normalizer, torch.logsumexp(logits.double(), -1))
        torch.testing.assert_close(statistics.parent_dot, (teacher.exp() * logits).sum(-1).double())
        expected = logits.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1).double()
        torch.testing.assert_close(statistics.label_logit, expected.where(labels != -100, torch.zeros(())).double())


def test_batches_merge_into_groups_unless_they_carry_extras():
    data = batches(num=3, rows=2, length=16)  # 32 tokens each
    assert [len(b.input_ids) for b in merge_batches(data, group_tokens=64)] == [4, 2]
    assert [len(b.input_ids) for b in merge_batches(data, group_tokens=32)] == [2, 2, 2]
    merged = merge_batches(data, group_tokens=1 << 20)[0]
    assert torch.equal(merged.labels, torch.cat([b.labels for b in data]))
    with_extras = [attrs.evolve(b, extra=("row",)) for b in data]
    assert len(merge_batches(with_extras, group_tokens=1 << 20)) == 3
    shorter = batches(num=1, rows=2, length=8)
    assert len(merge_batches([*data, *shorter], group_tokens=1 << 20)) == 2


def test_the_parents_own_block_is_not_run_again(setup, registries, monkeypatch):
    family, parent, runner, engine = setup
    layer = 1
    attention, ffn = runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn")
    computed = engine.score(layer, attention, ffn, scorers(registries), reuse_prefix=False)
    monkeypatch.setattr(engine, "outputs", lambda *a, **k: pytest.fail("ran the parent's own block"))
    assert engine.score(layer, attention, ffn, scorers(registries)) == pytest.approx(computed, abs=1e-6)


def test_cached_outputs_match_a_full_model_forward_with_the_block_swapped(setup):
    family, parent, runner, engine = setup
    from puzzle_core.blocks import BlockSpec

    layer = 2
    blocks = list(parent.shape.blocks)
    blocks[layer] = BlockSpec(AttentionSpec(no_op=True), parent.shape.blocks[layer].ffn)
    child = family.build_child(parent, blocks)
    attention = variant(family, parent, layer, AttentionSpec(no_op=True))
    for batch, outputs, _ in engine.outputs(layer, attention, runner.sublayer(layer, "ffn")):
        with torch.no_grad():
            expected = child.model(batch.input_ids).logits
        assert torch.allclose(outputs.head(outputs.hidden), expected, atol=1e-5)


def test_cache_larger_than_the_bound_is_a_user_error(registries):
    family, parent = tiny_parent(num_layers=2)
    with pytest.raises(UserError, match="max_cache_mib"):
        ReplaceOneBlockEngine(family.layer_runner(parent.model), batches(), keep_log_probs=True,
                              vocab_size=parent.shape.vocab_size, max_cache_mib=0.01, progress=False)


def test_session_shares_one_engine_per_data_and_keeps_log_probs_only_when_needed(registries):
    from puzzle_core.interfaces import ScoringData

    family, parent = tiny_parent(num_layers=2)
    runner = family.layer_runner(parent.model)
    loads = []

    def load():
        loads.append(1)
        return batches(num=1)

    data = ScoringData(key="same", load=load)
    chosen = scorers(registries)
    session = ScoringSession(runner, parent.shape.vocab_size, chosen, {name: data for name in chosen},
                             max_cache_mib=64, progress=False)
    values = session.score(0, runner.sublayer(0, "attention"), runner.sublayer(0, "ffn"))
    assert set(values) == set(SCORERS) and len(loads) == 1 and len(session._engines) == 1
    assert session.engine("same").parent[0]._log_probs is not None  # kl needs them

    cosine_only = ScoringSession(runner, parent.shape.vocab_size, {"cosine": chosen["cosine"]},
                                 {"cosine": data}, max_cache_mib=64, progress=False)
    assert cosine_only.engine("same").parent[0]._log_probs is None


def test_scorers_are_registered_with_descriptions(registries):
    for name in SCORERS:
        record = registries.scorers.get(name)
        assert record.description
        assert record.create().higher_is_better is False


def test_a_third_party_scorer_from_the_example_plugin_runs_in_the_engine(setup, registries):
    pytest.importorskip("puzzle_example_plugin", reason="pip install -e examples/puzzle-example-plugin")
    family, parent, runner, engine = setup
    chosen = {"top1_mismatch": registries.scorers.get("top1_mismatch").create()}
    layer = 0
    same = engine.score(layer, runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn"), chosen)
    noop = engine.score(layer, variant(family, parent, layer, AttentionSpec(no_op=True)),
                        runner.sublayer(layer, "ffn"), chosen)
    assert same["top1_mismatch"] == 0.0 and 0.0 < noop["top1_mismatch"] <= 1.0


@pytest.mark.slow
def test_smollm2_parent_block_scores_zero_kl_and_a_no_op_does_not(registries):
    from puzzle_core.parents import load_parent
    from puzzle_core.schema import ParentSection

    family, parent = load_parent(ParentSection(source="smollm2-135m"), registries)
    runner = family.layer_runner(parent.model)
    ids = torch.as_tensor(parent.tokenizer("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"][:64])[None]
    data = [ScoringBatch(ids, torch.ones_like(ids, dtype=torch.bool), next_token_labels(ids))]
    engine = ReplaceOneBlockEngine(runner, data, keep_log_probs=True, vocab_size=parent.shape.vocab_size,
                                   max_cache_mib=1024, progress=False)
    with torch.no_grad():
        parent_loss = parent.model(ids, labels=ids).loss.item()
    layer = parent.shape.num_layers - 1
    attention, ffn = runner.sublayer(layer, "attention"), runner.sublayer(layer, "ffn")
    own = engine.score(layer, attention, ffn, scorers(registries))
    noop = engine.score(layer, attention, variant(family, parent, layer, FFNSpec(no_op=True)), scorers(registries))
    # the parent's own block, computed: zero up to float32 rounding of 49k-way log-softmaxes (~1e-5 nats)
    assert abs(own["kl"]) < 5e-5 and own["lm_loss"] == pytest.approx(parent_loss, abs=1e-4)
    assert noop["kl"] > 1e-3
