"""The Llama family on tiny random parents: variants, children, runner, init, export and reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings

import attrs
import pytest
import torch
from safetensors.torch import load_file, save_file

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Calibration
from tests.tiny import tiny_parent, token_batch

MIXED = ["attn_g4+ffn_64", "attn_linear+ffn_linear", "attn_noop+ffn_noop", "attn_g2+ffn_16"]


def blocks(ids):
    return [BlockSpec.parse(i) for i in ids]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(scope="module")
def tiny():
    return tiny_parent()


# ---------------------------------------------------------------- variants


def test_variants_parent_first_and_every_kind(registries, tiny):
    family, parent = tiny
    provider = registries.block_variants.get("llama").create()
    space = provider.variants(parent.shape, 0)
    assert [a.id for a in space.attention] == ["attn_g2", "attn_g4", "attn_linear", "attn_noop"]
    assert [f.id for f in space.ffn] == ["ffn_128", "ffn_96", "ffn_64", "ffn_32", "ffn_16", "ffn_linear", "ffn_noop"]
    assert provider.init_method == "attention=fitted_kv,ffn=fitted,linear=lstsq"


def test_variant_options_gqa_rounding_and_subsets(registries):
    from puzzle_core.config import structure

    family, parent = tiny_parent()
    smollm_like = parent.shape.__class__(
        family="llama", num_layers=1, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=10, tie_word_embeddings=True,
        blocks=(BlockSpec(AttentionSpec(n_heads_in_group=3), FFNSpec(intermediate_size=1536)),),
    )
    record = registries.block_variants.get("llama")
    default = record.create().variants(smollm_like, 0)
    assert [a.id for a in default.attention] == ["attn_g3", "attn_g9", "attn_linear", "attn_noop"]
    assert [f.id for f in default.ffn][:5] == ["ffn_1536", "ffn_1152", "ffn_768", "ffn_384", "ffn_152"]
    options = structure({"ffn_fractions": [0.5, 0.001], "include_linear": False, "include_no_op": False,
                         "round_to": 64}, record.options)
    narrow = record.create(options).variants(smollm_like, 0)
    assert [f.id for f in narrow.ffn] == ["ffn_1536", "ffn_768", "ffn_64"]
    assert [a.id for a in narrow.attention] == ["attn_g3", "attn_g9"]
    with pytest.raises(Exception):
        structure({"ffn_fractions": [1.5]}, record.options)


# ---------------------------------------------------------------- children


@pytest.mark.parametrize("tie", [False, True])
def test_all_parent_child_reproduces_parent_logits(tie):
    family, parent = tiny_parent(seed=1, tie_word_embeddings=tie)
    child = family.build_child(parent, parent.shape.blocks)
    ids = token_batch()
    assert child.tokenizer is parent.tokenizer
    assert child.shape == parent.shape
    torch.testing.assert_close(logits(child.model, ids), logits(parent.model, ids), atol=1e-5, rtol=0)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    torch.testing.assert_close(
        logits(child.model, ids, attention_mask=mask), logits(parent.model, ids, attention_mask=mask), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("block_id", [
    "attn_g4+ffn_96", "attn_linear+ffn_linear", "attn_noop+ffn_noop", "attn_g2+ffn_8", "attn_noop+ffn_128",
])
def test_every_variant_builds_trains_exports_and_reloads(tiny, tmp_path, block_id):
    family, parent = tiny
    child = family.build_child(parent, blocks([block_id] + ["attn_g2+ffn_128"] * 3))
    ids = token_batch()
    child.model.train()
    loss = child.model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in child.model.model.layers[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    child.model.zero_grad()
    child.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        family.export(child, tmp_path / "child")
    back = family.load_child(tmp_path / "child")
    assert back.shape.blocks == child.shape.blocks
    torch.testing.assert_close(logits(back.model, ids), logits(child.model, ids), atol=1e-6, rtol=0)


def test_runner_pieces_equal_forward_on_parent_and_mixed_child(tiny):
    family, parent = tiny
    child = family.build_child(parent, blocks(MIXED))
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for model in (parent.model, child.model):
        runner = family.layer_runner(model)
        assert runner.num_layers == 4
        with torch.no_grad():
            hidden = runner.embed(ids)
            context = runner.context(hidden, attention_mask=mask)
            for index in range(runner.num_layers):
                hidden = runner.layer(index, hidden, context)
            torch.testing.assert_close(runner.head(hidden), logits(model, ids, attention_mask=mask), atol=1e-5, rtol=0)
    noop = family.layer_runner(child.model).sublayer(2, "ffn")
    hidden = torch.randn(1, 3, 64)
    assert torch.equal(noop(hidden, None), torch.zeros_like(hidden))
    assert list(noop.state_dict()) == []


def test_generate_uses_cache_and_skips_noop_layers(tiny):
    family, parent = tiny
    child = family.build_child(parent, blocks(["attn_noop+ffn_64", "attn_linear+ffn_linear", "attn_g4+ffn_noop",
                                               "attn_g2+ffn_128"]))
    prompt = token_batch(batch=1, length=5)
    generated = child.model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)
    full = logits(child.model, generated)
    assert torch.equal(full[0, 4:-1].argmax(-1), generated[0, 5:])  # cached steps agree with a full forward
    with torch.no_grad():
        out = child.model(prompt, use_cache=True)
    cache = out.cache
    assert len([layer for layer in cache.layers if layer.get_seq_length() > 0]) == 2  # two real attentions
    assert cache.get_seq_length() == 5
    batch = torch.tensor([[10, 11, 12, 13, 14], [3, 3, 20, 21, 22]])  # left-padded with pad id 3
    mask = (batch != 3).long()
    together = child.model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=3)
    for row, prompt in enumerate(([10, 11, 12, 13, 14], [20, 21, 22])):
        alone = child.model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=3)
        assert torch.equal(together[row, 5:], alone[0, len(prompt):])


def test_bfloat16_child_runs(tiny):
    family, parent = tiny
    child = family.build_child(parent, blocks(MIXED))
    child.model.to(torch.bfloat16)
    out = logits(child.model, token_batch())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_wrong_block_count_and_wrong_sublayer_weights_are_user_errors(tiny):
    family, parent = tiny
    with pytest.raises(UserError, match="one block per parent layer"):
        family.build_child(parent, blocks(MIXED[:2]))
    weights = family.init_sublayer(parent, 0, FFNSpec(intermediate_size=32), None).state_dict()
    with pytest.raises(UserError, match="do not fit variant ffn_64"):
        family.build_child(parent, blocks(MIXED), sublayers={(0, "ffn"): weights})


# ---------------------------------------------------------------- initialisation


def _calibration(parent, family, layer, part, tokens=48, seed=3):
    runner = family.layer_runner(parent.model)
    ids = token_batch(batch=2, length=tokens // 2, seed=seed)
    with torch.no_grad():
        hidden = runner.embed(ids)
        context = runner.context(hidden)
        for index in range(layer):
            hidden = runner.layer(index, hidden, context)
        if part == "ffn":
            hidden = hidden + runner.sublayer(layer, "attention")(hidden, context)
        delta = runner.sublayer(layer, part)(hidden, context)
    return Calibration(inputs=hidden.reshape(-1, 64), outputs=delta.reshape(-1, 64)), hidden, context, delta


def test_gqa_init_averages_grouped_kv_heads(tiny):
    family, parent = tiny
    module = family.init_sublayer(parent, 1, AttentionSpec(n_heads_in_group=4), None)
    parent_k = parent.model.model.layers[1].self_attn.k_proj.weight.reshape(2, 16, 64)
    torch.testing.assert_close(module.self_attn.k_proj.weight, parent_k.mean(0))
    first = family.init_sublayer(parent, 1, AttentionSpec(n_heads_in_group=4), None, "attention=first_kv")
    torch.testing.assert_close(first.self_attn.k_proj.weight, parent_k[0])
    same = family.init_sublayer(parent, 1, AttentionSpec(n_heads_in_group=2), None)
    assert set(same.state_dict()) == {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight", "self_attn.o_proj.weight"}
    _, hidden, context, delta = _calibration(parent, family, 1, "attention")
    with torch.no_grad():
        torch.testing.assert_close(same(hidden, context), delta, atol=1e-6, rtol=0)


def test_ffn_init_keeps_the_most_active_channels(tiny):
    from puzzle_core.api.decoder import channel_importance

    family, parent = tiny
    calibration, hidden, context, delta = _calibration(parent, family, 2, "ffn")
    layer = parent.model.model.layers[2]
    importance = channel_importance(layer.mlp, layer.post_attention_layernorm, calibration, "activations")
    keep = importance.topk(32).indices.sort().values
    module = family.init_sublayer(parent, 2, FFNSpec(intermediate_size=32), calibration, "ffn=activations")
    torch.testing.assert_close(module.mlp.gate_proj.weight, layer.mlp.gate_proj.weight[keep])
    torch.testing.assert_close(module.mlp.down_proj.weight, layer.mlp.down_proj.weight[:, keep])
    by_weights = family.init_sublayer(parent, 2, FFNSpec(intermediate_size=32), None)
    with torch.no_grad():
        error = lambda m: ((m(hidden, context) - delta) ** 2).sum() / (delta**2).sum()  # noqa: E731
        assert error(module) < error(by_weights)  # activations are measured on the very tokens scored here
        full = family.init_sublayer(parent, 2, FFNSpec(intermediate_size=128), calibration, "ffn=activations")
        torch.testing.assert_close(full(hidden, context), delta, atol=1e-6, rtol=0)


def _eight_head_parent(pairs):
    """A 2-layer parent with 8 query heads and 4 KV heads (of 16 dimensions) whose K/V heads ``pairs`` are equal."""
    from transformers import LlamaForCausalLM

    from puzzle_core.interfaces import LoadedModel
    from puzzle_plugins.llama.aliases import byte_tokenizer, tiny_llama_config
    from tests.tiny import llama_family

    family, tokenizer = llama_family(), byte_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers = 8, 4, 2
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = LlamaForCausalLM(config).eval()
    attention = model.model.layers[1].self_attn
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            weight = getattr(attention, name).weight.view(4, 16, 64)
            for source, copy in pairs:
                weight[copy] = weight[source]
    return family, LoadedModel(model, tokenizer, family.shape(config.to_dict()), source="eight heads")


def _attention_error(module, hidden, context, delta):
    with torch.no_grad():
        return float(((module(hidden, context) - delta) ** 2).sum() / (delta**2).sum())


def test_similar_kv_merges_alike_heads_that_are_not_neighbours():
    """KV heads 0 = 2 and 1 = 3: similarity grouping pairs them (moving the query heads along), so the merged
    attention reproduces the parent exactly; consecutive groups (0, 1), (2, 3) cannot."""
    family, parent = _eight_head_parent([(0, 2), (1, 3)])
    calibration, hidden, context, delta = _calibration(parent, family, 1, "attention", tokens=96)
    spec = AttentionSpec(n_heads_in_group=4)  # 2 KV heads
    errors = {method: _attention_error(family.init_sublayer(parent, 1, spec, calibration, f"attention={method}"),
                                       hidden, context, delta) for method in ("mean_kv", "similar_kv", "fitted_kv")}
    assert errors["similar_kv"] < 1e-10 and errors["fitted_kv"] < 1e-8
    assert errors["mean_kv"] > 0.1


def test_fitted_kv_absorbs_per_frequency_key_factors_into_the_queries(tiny):
    """KV head 1's keys are head 0's times a complex factor per rotary frequency (values equal): exact after
    fitting, whatever the positions; averaging the weights is not. Deterministic; mean_kv without calibration."""
    family, parent = tiny
    attention = parent.model.model.layers[1].self_attn
    original = {name: getattr(attention, name).weight.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
    generator = torch.Generator().manual_seed(0)
    factor = torch.complex(torch.randn(8, generator=generator), torch.randn(8, generator=generator))
    with torch.no_grad():
        attention.q_proj.weight.mul_(8.0)  # random weights give near-uniform attention; make the keys matter
        keys = attention.k_proj.weight.view(2, 16, 64)
        rotated = torch.complex(keys[0, :8], keys[0, 8:]) * factor[:, None]
        keys[1, :8], keys[1, 8:] = rotated.real, rotated.imag
        attention.v_proj.weight.view(2, 16, 64)[1] = attention.v_proj.weight.view(2, 16, 64)[0]
    try:
        calibration, hidden, context, delta = _calibration(parent, family, 1, "attention", tokens=96)
        spec = AttentionSpec(n_heads_in_group=4)
        fitted = family.init_sublayer(parent, 1, spec, calibration, "attention=fitted_kv")
        again = family.init_sublayer(parent, 1, spec, calibration, "attention=fitted_kv")
        mean = family.init_sublayer(parent, 1, spec, calibration, "attention=mean_kv")
        assert all(torch.equal(a, b) for a, b in zip(fitted.state_dict().values(), again.state_dict().values()))
        assert _attention_error(fitted, hidden, context, delta) < 1e-8
        assert _attention_error(mean, hidden, context, delta) > 1e-3
        uncalibrated = family.init_sublayer(parent, 1, spec, None, "attention=fitted_kv")
        expected = attention.k_proj.weight.detach().reshape(2, 16, 64).mean(0)
        torch.testing.assert_close(uncalibrated.self_attn.k_proj.weight.detach(), expected)
    finally:
        with torch.no_grad():
            for name, weight in original.items():
                getattr(attention, name).weight.copy_(weight)


def test_fitted_kv_beats_mean_and_random_heads_on_held_out_tokens(tiny):
    family, parent = tiny
    calibration, *_ = _calibration(parent, family, 2, "attention", tokens=96)
    _, hidden, context, delta = _calibration(parent, family, 2, "attention", tokens=96, seed=11)
    spec = AttentionSpec(n_heads_in_group=4)
    fitted, mean = (family.init_sublayer(parent, 2, spec, calibration, f"attention={method}")
                    for method in ("fitted_kv", "mean_kv"))
    random = family.init_sublayer(parent, 2, spec, calibration, "attention=mean_kv")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name in ("k_proj", "v_proj"):
            weight = getattr(random.self_attn, name).weight
            weight.copy_(torch.randn_like(weight) * weight.std())
    errors = [_attention_error(m, hidden, context, delta) for m in (fitted, mean, random)]
    assert errors[0] < errors[1] < errors[2]


def test_channel_contribution_weighs_activations_by_the_down_projection(tiny):
    """Channels that fire but whose down-projection column is ~0 add nothing: contribution drops them."""
    from puzzle_core.api.decoder import channel_importance

    family, parent = tiny
    layer = parent.model.model.layers[2]
    calibration, hidden, context, delta = _calibration(parent, family, 2, "ffn")
    active = channel_importance(layer.mlp, layer.post_attention_layernorm, calibration, "activations")
    loud = active.topk(32).indices
    original = layer.mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, loud] *= 1e-3
    try:
        calibration, hidden, context, delta = _calibration(parent, family, 2, "ffn")
        spec = FFNSpec(intermediate_size=32)
        contribution = family.init_sublayer(parent, 2, spec, calibration, "ffn=contribution")
        again = family.init_sublayer(parent, 2, spec, calibration, "ffn=contribution")
        activations = family.init_sublayer(parent, 2, spec, calibration, "ffn=activations")
        assert torch.equal(contribution.mlp.down_proj.weight, again.mlp.down_proj.weight)
        kept = set(channel_importance(layer.mlp, layer.post_attention_layernorm, calibration,
                                      "contribution").topk(32).indices.tolist())
        assert not kept & set(loud.tolist())
        random = family.init_sublayer(parent, 2, spec, calibration, "ffn=activations")
        keep = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:32].sort().values
        with torch.no_grad():
            random.mlp.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[keep])
            random.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight[keep])
            random.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, keep])
        errors = [_attention_error(m, hidden, context, delta) for m in (contribution, random, activations)]
        assert errors[0] < errors[1] and errors[0] < errors[2]
    finally:
        with torch.no_grad():
            layer.mlp.down_proj.weight.copy_(original)


def test_fitted_ffn_refits_the_down_projection_on_calibration_tokens(tiny):
    """Channels 64-127 fire exactly like channels 0-63 and write 0.3x their columns: keeping 64 channels loses
    that share of the output unless the kept columns are re-fitted (towards 1.3x)."""
    family, parent = tiny
    mlp = parent.model.model.layers[2].mlp
    original = {name: getattr(mlp, name).weight.detach().clone() for name in ("gate_proj", "up_proj", "down_proj")}
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            getattr(mlp, name).weight[64:] = getattr(mlp, name).weight[:64]
        mlp.down_proj.weight[:, 64:] = 0.3 * mlp.down_proj.weight[:, :64]
    try:
        calibration, *_ = _calibration(parent, family, 2, "ffn", tokens=512)
        _, hidden, context, delta = _calibration(parent, family, 2, "ffn", tokens=96, seed=11)
        spec = FFNSpec(intermediate_size=64)
        fitted, again, chosen = (family.init_sublayer(parent, 2, spec, calibration, f"ffn={method}")
                                 for method in ("fitted", "fitted", "contribution"))
        torch.testing.assert_close(fitted.mlp.gate_proj.weight, chosen.mlp.gate_proj.weight)  # the same channels
        assert torch.equal(fitted.mlp.down_proj.weight, again.mlp.down_proj.weight)
        errors = [_attention_error(m, hidden, context, delta) for m in (fitted, chosen)]
        assert errors[0] < 0.5 * errors[1]
        full = family.init_sublayer(parent, 2, FFNSpec(intermediate_size=128), calibration, "ffn=fitted")
        with torch.no_grad():
            torch.testing.assert_close(full(hidden, context), delta, atol=1e-6, rtol=1e-4)  # nothing to improve on
    finally:
        with torch.no_grad():
            for name, weight in original.items():
                getattr(mlp, name).weight.copy_(weight)


@pytest.mark.parametrize("part,spec", [("attention", AttentionSpec(replace_with_linear=True)),
                                       ("ffn", FFNSpec(replace_with_linear=True))])
def test_linear_init_is_a_least_squares_fit(tiny, part, spec):
    family, parent = tiny
    calibration, hidden, context, delta = _calibration(parent, family, 0, part, tokens=200)
    fitted = family.init_sublayer(parent, 0, spec, calibration)
    zeros = family.init_sublayer(parent, 0, spec, None)
    name = "self_attn.linear_attn.weight" if part == "attention" else "mlp.linear_mlp.weight"
    assert name in fitted.state_dict() and not zeros.state_dict()[name].any()
    with torch.no_grad():
        residual = ((fitted(hidden, context) - delta) ** 2).sum() / (delta**2).sum()
    assert residual < 0.9  # better than the zero map, which leaves all of it
    with pytest.raises(UserError, match="not understood"):
        family.init_sublayer(parent, 0, spec, calibration, "fast")


def test_build_child_loads_given_sublayer_weights(tiny):
    family, parent = tiny
    weights = family.init_sublayer(parent, 0, FFNSpec(intermediate_size=64), None).state_dict()
    weights = {k: torch.randn_like(v) for k, v in weights.items()}
    child = family.build_child(parent, blocks(MIXED), sublayers={(0, "ffn"): weights})
    layer = child.model.model.layers[0]
    assert torch.equal(layer.mlp.up_proj.weight, weights["mlp.up_proj.weight"])
    assert torch.equal(layer.post_attention_layernorm.weight, weights["post_attention_layernorm.weight"])


# ---------------------------------------------------------------- shapes and published configs


LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "rope_theta": 500000.0,
}


def test_shape_from_config_alone():
    from tests.tiny import llama_family

    family = llama_family()
    shape = family.shape(LLAMA_70B)
    assert (shape.num_layers, shape.num_key_value_heads, shape.head_dim) == (80, 8, 128)
    assert shape.blocks[0].id == "attn_g8+ffn_28672" and len(set(shape.blocks)) == 1
    nemotron = {**LLAMA_70B, "model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"],
                "intermediate_size": None, "num_key_value_heads": None, "num_hidden_layers": 3,
                "block_configs": [
                    {"attention": {"n_heads_in_group": 8, "no_op": False, "replace_with_linear": False},
                     "ffn": {"ffn_mult": 5.25, "no_op": False, "replace_with_linear": False}},
                    {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
                     "ffn": {"ffn_mult": 1.3125, "no_op": False, "replace_with_linear": False}},
                    {"attention": {"n_heads_in_group": 64, "no_op": False, "replace_with_linear": False},
                     "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}},
                ]}
    assert family.detect(nemotron) and family.detect(LLAMA_70B) and not family.detect({"model_type": "gpt2"})
    child = family.shape(nemotron)
    assert [b.id for b in child.blocks] == ["attn_g8+ffn_28672", "attn_noop+ffn_7168", "attn_g64+ffn_noop"]
    assert (child.num_key_value_heads, child.intermediate_size) == (8, 28672)
    with pytest.raises(UserError, match="window_length"):
        family.shape({**nemotron, "block_configs": [
            {"attention": {"n_heads_in_group": 8, "window_length": 4096}, "ffn": {"ffn_mult": 1.0}}] * 3})


def test_ffn_mult_only_when_the_published_rule_gives_the_size():
    from puzzle_core.api.decoder import block_config, block_spec

    for size, hidden, mult in [(28672, 8192, 5.25), (7168, 8192, 1.3125), (768, 576, 2.0), (1152, 576, None),
                               (384, 576, None), (152, 576, None)]:
        entry = block_config(BlockSpec(AttentionSpec(n_heads_in_group=3), FFNSpec(intermediate_size=size)), hidden)
        assert entry["ffn"].get("ffn_mult") == mult
        assert ("intermediate_size" in entry["ffn"]) == (mult is None)
        assert block_spec(entry, hidden).ffn.intermediate_size == size


# ---------------------------------------------------------------- export layout and loading


def test_export_layout(tiny, tmp_path):
    family, parent = tiny
    child = family.build_child(parent, blocks(MIXED))
    with pytest.warns(UserWarning, match="vLLM"):
        family.export(child, tmp_path / "child")
    folder = tmp_path / "child"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_decilm.py", "modeling_decilm.py",
            "block_configs.py", "heterogeneous_decoder.py", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                                  "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert config["intermediate_size"] is None and config["num_key_value_heads"] is None
    first, linear, noop, last = config["block_configs"]
    assert first["attention"]["n_heads_in_group"] == 4 and first["ffn"]["intermediate_size"] == 64
    assert "ffn_mult" not in first["ffn"]
    assert linear["attention"]["replace_with_linear"] and linear["ffn"]["replace_with_linear"]
    assert noop["attention"]["no_op"] and noop["ffn"]["no_op"] and not noop["attention"]["replace_with_linear"]
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.linear_attn.weight"].shape == (64, 64)
    assert tensors["model.layers.1.mlp.linear_mlp.weight"].shape == (64, 64)
    assert not any(k.startswith("model.layers.2.") for k in tensors)  # no-op blocks have no norms either
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    source = "".join(path.read_text() for path in folder.glob("*.py"))
    assert "puzzle" not in source
    assert config["puzzle_architecture"] == "llama"


def test_load_child_rejects_block_configs_that_disagree_with_weights(tiny, tmp_path):
    family, parent = tiny
    child = family.build_child(parent, blocks(["attn_g2+ffn_128"] * 4))
    family.export(child, tmp_path / "child")
    config_path = tmp_path / "child" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_configs"][1]["ffn"] = {"intermediate_size": 64, "no_op": False, "replace_with_linear": False}
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="disagree with the weights.*model.layers.1.mlp"):
        family.load_child(tmp_path / "child")
    with pytest.raises(UserError, match="does not exist"):
        family.load_child(tmp_path / "missing")


def test_load_child_reads_published_style_checkpoint(tiny, tmp_path):
    """ffn_mult sizes, extra block keys, tied embeddings without an lm_head tensor, no tokenizer."""
    family, parent = tiny_parent(seed=2, tie_word_embeddings=True)
    child = family.build_child(parent, blocks(["attn_g2+ffn_128"] * 4))
    folder = tmp_path / "published"
    folder.mkdir()
    config = child.model.config.to_dict()
    for entry in config["block_configs"]:
        # the published rule: 2 * 3.0 * 64 / 3 = 128, rounded up to a multiple of 256
        entry["ffn"] = {"ffn_mult": 3.0, "no_op": False, "replace_with_linear": False, "sparsify": None}
    state = {k: v for k, v in child.model.state_dict().items() if k != "lm_head.weight"}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"is \(128, 64\), expected \(256, 64\)"):
        family.load_child(folder)
    for entry in config["block_configs"]:
        entry["ffn"] = {"intermediate_size": 128, "no_op": False, "replace_with_linear": False, "sparsify": None}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = family.load_child(folder)
    assert loaded.tokenizer is None
    ids = token_batch()
    torch.testing.assert_close(logits(loaded.model, ids), logits(parent.model, ids), atol=1e-5, rtol=0)


ISOLATED_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path.append(sys.argv[1])
    assert importlib.util.find_spec("puzzle_core") is None, "puzzle_core must not be importable here"
    assert importlib.util.find_spec("puzzle_plugins") is None
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = load_file(sys.argv[3])
    with torch.no_grad():
        out = model(inputs["ids"], attention_mask=inputs["mask"]).logits
    generated = model.generate(inputs["ids"][:1], max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    save_file({"logits": out, "generated": generated}, sys.argv[4])
    print(type(model).__module__, type(model).__name__)
""")


def test_mixed_child_loads_in_a_python_without_our_package(tiny, tmp_path):
    family, parent = tiny
    child = family.build_child(parent, blocks(["attn_noop+ffn_64", "attn_linear+ffn_linear", "attn_g4+ffn_noop",
                                               "attn_g2+ffn_16"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        family.export(child, tmp_path / "child")
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    save_file({"ids": ids, "mask": mask}, str(tmp_path / "inputs.safetensors"))
    script = tmp_path / "isolated.py"
    script.write_text(ISOLATED_SCRIPT)
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # -I: no user site, no PYTHON* variables, script dir not on the path; -S: no site-packages .pth files,
    # so the editable install of this repository is invisible; only the plain site-packages folder is added.
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script), sysconfig.get_paths()["purelib"], str(tmp_path / "child"),
         str(tmp_path / "inputs.safetensors"), str(tmp_path / "outputs.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "DeciLMForCausalLM" in result.stdout
    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    torch.testing.assert_close(outputs["logits"], logits(child.model, ids, attention_mask=mask), atol=1e-5, rtol=0)
    expected = child.model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=3)
    assert torch.equal(outputs["generated"], expected)


# ---------------------------------------------------------------- random models, look-alike families


def test_random_model_follows_the_shape(tiny):
    family, parent = tiny
    uniform = family.random_model(parent.shape)
    assert isinstance(uniform, family.code.model_class) and family.shape(uniform.config.to_dict()) == parent.shape
    mixed_shape = parent.shape.with_blocks(blocks(MIXED))
    mixed = family.random_model(mixed_shape, dtype="bfloat16")
    assert type(mixed).__name__ == "DeciLMForCausalLM" and next(mixed.parameters()).dtype == torch.bfloat16
    assert family.shape(mixed.config.to_dict()).blocks == mixed_shape.blocks
    assert mixed(token_batch()).logits.shape == (2, 12, 260)
    empty = family.random_model(attrs.evolve(parent.shape, num_layers=0, blocks=()))  # fixed costs are timed on it
    assert empty(token_batch()).logits.shape == (2, 12, 260)


def test_a_child_used_as_parent_cannot_grow_back_removed_weights(tiny):
    family, parent = tiny
    child = family.build_child(parent, blocks(MIXED))
    with pytest.raises(UserError, match="cannot be initialised from the parent's attn_noop"):
        family.build_child(child, blocks(["attn_g4+ffn_64", "attn_linear+ffn_linear", "attn_g4+ffn_noop",
                                          "attn_g2+ffn_16"]))
    smaller = family.build_child(child, blocks(["attn_g4+ffn_32", "attn_noop+ffn_linear", "attn_noop+ffn_noop",
                                                "attn_g4+ffn_8"]))
    assert torch.isfinite(logits(smaller.model, token_batch())).all()


def test_a_look_alike_family_is_a_few_lines(tmp_path):
    """A Mistral family: Llama's modules and children, its own model_type; it inherits neither Llama's aliases
    nor its claim on unmarked (published) DeciLM children, and recognises its own (short inputs stay inside
    Mistral's window)."""
    from transformers import MistralConfig, MistralForCausalLM

    from puzzle_core.interfaces import LoadedModel
    from puzzle_plugins.llama.family import LlamaFamily

    class MistralFamily(LlamaFamily):
        name = "mistral"
        model_types = ("mistral",)

    family, llama = MistralFamily(), LlamaFamily()
    assert family.aliases() == {} and "tiny-random-llama" in llama.aliases()
    config = MistralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MistralForCausalLM(config).eval()
    assert family.detect(config.to_dict()) and not llama.detect(config.to_dict())
    parent = LoadedModel(model, None, family.shape(config.to_dict()))
    child = family.build_child(parent, parent.shape.blocks)
    ids = token_batch()
    torch.testing.assert_close(logits(child.model, ids), logits(model, ids), atol=1e-5, rtol=0)
    mixed = family.build_child(parent, blocks(MIXED))
    assert mixed.shape.family == "mistral" and torch.isfinite(logits(mixed.model, ids)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        family.export(mixed, tmp_path / "child")
    exported = json.loads((tmp_path / "child" / "config.json").read_text())
    assert exported["puzzle_architecture"] == "mistral"
    assert family.detect(exported) and not llama.detect(exported)
    published = {k: v for k, v in exported.items() if k != "puzzle_architecture"}
    assert llama.detect(published) and not family.detect(published)


def test_exporting_a_plain_parent_writes_an_all_parent_child(tiny, tmp_path):
    family, parent = tiny
    family.export(parent, tmp_path / "parent")
    back = family.load_child(tmp_path / "parent")
    assert back.shape.blocks == parent.shape.blocks
    ids = token_batch()
    torch.testing.assert_close(logits(back.model, ids), logits(parent.model, ids), atol=1e-5, rtol=0)
