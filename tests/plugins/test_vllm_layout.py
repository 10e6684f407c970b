"""Exported Llama children read the way vLLM's ``nemotron_nas`` model reads them.

A Python that cannot import puzzle loads each exported ``config.json`` with its own
configuration code (``AutoConfig``, ``trust_remote_code``, as vLLM does) and replays
vLLM's reading, step by step: ``config.block_configs[i]`` by attribute,
``attention.no_op`` / ``ffn.no_op``, KV heads from ``n_heads_in_group``, the FFN width
from ``ffn_mult`` when ``hasattr(ffn, "ffn_mult")`` else ``intermediate_size``, the
attention biases from ``attention_bias`` / ``qkv_bias``, norms only around sub-blocks that
are not no-ops, and KV-cache layers only for attention that is not a no-op. From that it
lists the tensors (names and shapes) vLLM would load, which must be exactly those in the
safetensors files. A child with linear replacements, which vLLM has no branch for, is
exported with a warning, and the replay shows the mismatch in exactly those layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

from puzzle_core.blocks import BlockSpec

REPLAY = textwrap.dedent('''
    import importlib.util, json, sys
    sys.path.extend(json.loads(sys.argv[1]))
    assert importlib.util.find_spec("puzzle_core") is None and importlib.util.find_spec("puzzle_plugins") is None
    from transformers import AutoConfig

    def ffn_mult_to_intermediate_size(ffn_mult, n_embd):  # vLLM's _ffn_mult_to_intermediate_size
        intermediate_size = int(2 * ffn_mult * n_embd / 3)
        return intermediate_size if intermediate_size % 256 == 0 else intermediate_size + 256 - intermediate_size % 256

    report = {}
    for folder in sys.argv[2:]:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        attention_bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
        bias_o_proj = attention_bias
        if hasattr(config, "qkv_bias"):
            attention_bias = config.qkv_bias
        tensors = {"model.embed_tokens.weight": [config.vocab_size, hidden], "model.norm.weight": [hidden]}
        if not config.tie_word_embeddings:
            tensors["lm_head.weight"] = [config.vocab_size, hidden]
        kv_cache_layers, sizes, failed = 0, [], {}
        for layer in range(config.num_hidden_layers):
            block_config = config.block_configs[layer]
            prefix, layer_tensors, size = f"model.layers.{layer}.", {}, None
            try:  # where vLLM's model constructor would raise, the layer is reported instead
                if not block_config.attention.no_op:
                    kv_heads = heads // block_config.attention.n_heads_in_group
                    layer_tensors[prefix + "input_layernorm.weight"] = [hidden]
                    for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                                       ("v_proj", kv_heads * head_dim)):
                        layer_tensors[prefix + f"self_attn.{name}.weight"] = [rows, hidden]
                        if attention_bias:
                            layer_tensors[prefix + f"self_attn.{name}.bias"] = [rows]
                    layer_tensors[prefix + "self_attn.o_proj.weight"] = [hidden, heads * head_dim]
                    if bias_o_proj:
                        layer_tensors[prefix + "self_attn.o_proj.bias"] = [hidden]
                if not block_config.ffn.no_op:
                    if hasattr(block_config.ffn, "ffn_mult"):
                        size = ffn_mult_to_intermediate_size(block_config.ffn.ffn_mult, hidden)
                    else:
                        size = block_config.ffn.intermediate_size
                    layer_tensors[prefix + "post_attention_layernorm.weight"] = [hidden]
                    for name, shape in (("gate_proj", [size, hidden]), ("up_proj", [size, hidden]),
                                        ("down_proj", [hidden, size])):
                        layer_tensors[prefix + f"mlp.{name}.weight"] = shape
                        if getattr(config, "mlp_bias", False):
                            layer_tensors[prefix + f"mlp.{name}.bias"] = shape[:1]
            except Exception as exc:
                failed[layer] = f"{type(exc).__name__}: {exc}"
                continue
            tensors.update(layer_tensors)
            sizes.append(size)
            kv_cache_layers += not block_config.attention.no_op
        saved = json.load(open(f"{folder}/config.json"))["block_configs"]
        report[folder] = {"tensors": tensors, "kv_cache_layers": kv_cache_layers, "sizes": sizes, "failed": failed,
                          "round_trip": config.to_dict()["block_configs"] == saved,
                          "config_class": type(config).__module__}
    print(json.dumps(report))
''')

# hidden 64 with a 512-wide FFN: 512 and 256 are sizes the ffn_mult rule gives (ffn_mult 12.0 and 6.0), 384 and 200 are not
SERVABLE = ["attn_g2+ffn_512", "attn_g4+ffn_256", "attn_noop+ffn_384", "attn_g2+ffn_noop", "attn_noop+ffn_noop",
            "attn_g2+ffn_200"]
WITH_LINEAR = ["attn_g2+ffn_512", "attn_linear+ffn_256", "attn_g4+ffn_linear", "attn_g2+ffn_noop", "attn_g2+ffn_512",
               "attn_g2+ffn_512"]


@pytest.fixture(scope="module")
def parent():
    from transformers import LlamaForCausalLM

    from puzzle_core.interfaces import LoadedModel
    from puzzle_plugins.llama.aliases import byte_tokenizer, tiny_llama_config
    from tests.tiny import llama_family

    family, tokenizer = llama_family(), byte_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    config.intermediate_size, config.num_hidden_layers = 512, 6
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    return family, LoadedModel(model, tokenizer, family.shape(config.to_dict()), source="tiny")


@pytest.fixture(scope="module")
def replayed(parent, tmp_path_factory):
    """Exported children (all-parent, every servable kind, with linear maps) and vLLM's reading of each."""
    from puzzle_plugins.llama.family import LinearReplacementWarning

    family, model = parent
    root = tmp_path_factory.mktemp("vllm")
    children = {}
    for name, ids in (("parent", [b.id for b in model.shape.blocks]), ("servable", SERVABLE), ("linear", WITH_LINEAR)):
        child = family.build_child(model, [BlockSpec.parse(b) for b in ids])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            family.export(child, root / name)
        children[name] = {"child": child, "warned": [w for w in caught if w.category is LinearReplacementWarning]}
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(  # -I -S: the editable installs of puzzle and its plugins are invisible
        [sys.executable, "-I", "-S", "-c", REPLAY, json.dumps([sysconfig.get_paths()["purelib"]]),
         *(str(root / name) for name in children)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for name in children:
        children[name]["replay"] = report[str(root / name)]
        children[name]["tensors"] = {k: list(v.shape) for k, v in load_file(str(root / name / "model.safetensors")).items()}
    return children


@pytest.mark.parametrize("name", ["parent", "servable"])
def test_vllm_would_load_exactly_the_exported_tensors(replayed, name):
    child = replayed[name]
    assert child["replay"]["config_class"].startswith("transformers_modules")  # our exported configuration code
    assert child["replay"]["failed"] == {}
    assert child["replay"]["tensors"] == child["tensors"]
    assert child["replay"]["round_trip"]  # attribute objects go back to the very dicts of config.json
    assert child["warned"] == []


def test_sizes_norms_and_kv_cache_layers_are_those_of_the_child(replayed):
    child = replayed["servable"]
    blocks = child["child"].shape.blocks
    assert child["replay"]["sizes"] == [b.ffn.intermediate_size for b in blocks] == [512, 256, 384, None, None, 200]
    attention_layers = sum(b.attention.kind == "attention" for b in blocks)
    assert child["replay"]["kv_cache_layers"] == attention_layers == child["child"].model.model.num_cached_layers == 4
    with torch.no_grad():
        cache = child["child"].model(torch.tensor([[5, 6, 7]]), use_cache=True).cache
    assert len([layer for layer in cache.layers if layer.get_seq_length() > 0]) == attention_layers


def test_the_config_keeps_ffn_mult_only_where_the_rule_gives_the_size(replayed, tmp_path):
    saved = json.loads(json.dumps(replayed["servable"]["child"].model.config.to_dict()["block_configs"]))
    assert [("ffn_mult" in b["ffn"], "intermediate_size" in b["ffn"]) for b in saved] == [
        (True, False), (True, False), (False, True), (True, False), (True, False), (False, True)]
    assert [b["ffn"].get("ffn_mult") for b in saved][:2] == [12.0, 6.0]


def test_linear_replacements_warn_and_are_the_only_layers_vllm_cannot_build(replayed):
    child = replayed["linear"]
    assert len(child["warned"]) == 1 and "[1, 2]" in str(child["warned"][0].message)
    assert sorted(child["replay"]["failed"]) == ["1", "2"]  # a linear map has no n_heads_in_group / ffn_mult to read
    others = {name: shape for name, shape in child["tensors"].items() if name.split(".")[2:3] not in (["1"], ["2"])}
    assert child["replay"]["tensors"] == others
