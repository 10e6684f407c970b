"""``puzzle model info`` on a folder holding only a ``config.json``: exact parameters, blocks, predicted costs."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
}
LLAMA_31_8B_PARAMS = 8_030_261_248  # the published parameter count of Llama-3.1-8B


def _attention(kind: str, group: int | None = None) -> dict:
    return {"n_heads_in_group": group, "no_op": kind == "no_op", "replace_with_linear": kind == "linear"}


def _ffn(kind: str, **size) -> dict:
    return {"no_op": kind == "no_op", "replace_with_linear": kind == "linear", **size}


# A DeciLM (nemotron-nas) child of a tiny Llama with one block of each kind, sizes given both ways.
DECILM = {
    "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": 64, "num_hidden_layers": 5,
    "num_attention_heads": 4, "head_dim": 16, "vocab_size": 97, "tie_word_embeddings": False,
    "intermediate_size": None, "num_key_value_heads": None, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
    "block_configs": [
        {"attention": _attention("attention", 2), "ffn": _ffn("ffn", ffn_mult=3.0)},  # 2*3*64/3 = 128 -> 256
        {"attention": _attention("no_op"), "ffn": _ffn("ffn", intermediate_size=96)},
        {"attention": _attention("linear"), "ffn": _ffn("linear")},
        {"attention": _attention("attention", 4), "ffn": _ffn("no_op")},
        {"attention": _attention("attention", 1), "ffn": _ffn("ffn", intermediate_size=128)},
    ],
}
DECILM_BLOCKS = ["attn_g2+ffn_256", "attn_noop+ffn_96", "attn_linear+ffn_linear", "attn_g4+ffn_noop",
                 "attn_g1+ffn_128"]


def invoke(*args):
    from puzzle_core.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def config_folder(tmp_path, config: dict):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def info_json(*args) -> dict:
    result = invoke("model", "info", *map(str, args), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_llama_8b_config_only(tmp_path):
    folder = config_folder(tmp_path, LLAMA_31_8B)
    text = invoke("model", "info", str(folder), "--cost-model", "h100", "--set", "scenario.batch_size=8")
    assert text.exit_code == 0, text.output
    assert "8,030,261,248 parameters" in text.output and "config only" in text.output
    assert "layers 0-31 (now attn_g4+ffn_14336)" in text.output and "tokens/s" in text.output

    data = info_json(folder, "--cost-model", "h100", "--set", "scenario.batch_size=8", "--largest-batch")
    assert data["params"] == LLAMA_31_8B_PARAMS
    assert [row["block"] for row in data["layers"]] == ["attn_g4+ffn_14336"] * 32
    costs = data["costs"]
    assert costs["total"]["num_params"] == LLAMA_31_8B_PARAMS
    layer_ms = costs["layers"][0]["runtime_ms"]
    assert costs["total"]["runtime_ms"] == pytest.approx(costs["fixed"]["runtime_ms"] + 32 * layer_ms)
    # bf16 weights: 2 bytes per parameter
    assert costs["total"]["weights_mib"] == pytest.approx(2 * LLAMA_31_8B_PARAMS / 2**20)
    assert costs["total"]["fits"] is True
    best = costs["largest_batch"]
    assert best["fits"] and best["batch_size"] > 8 and best["tokens_per_s"] > costs["total"]["tokens_per_s"]
    # one more sequence would not fit
    more = info_json(folder, "--cost-model", "h100", "--set", f"scenario.batch_size={best['batch_size'] + 1}")
    assert more["costs"]["total"]["fits"] is False


def test_decilm_heterogeneous_config_matches_the_built_model(tmp_path):
    from puzzle_plugins.llama.family import LlamaFamily

    folder = config_folder(tmp_path, DECILM)
    data = info_json(folder, "--cost-model", "rtx4090", "--set", "scenario.dtype=fp8")
    code = LlamaFamily.code  # the child's own configuration and modeling classes, as exported
    built = code.model_class(code.config_class(**DECILM))
    assert data["params"] == sum(p.numel() for p in built.parameters())
    assert [row["block"] for row in data["layers"]] == DECILM_BLOCKS
    per_layer = {row["block"]: row for row in data["costs"]["layers"]}
    assert per_layer["attn_g4+ffn_noop"]["num_kv_heads"] == 1 and per_layer["attn_noop+ffn_96"]["kv_cache_mib"] == 0
    assert data["costs"]["scenario"]["dtype"] == "fp8"
    text = invoke("model", "info", str(folder))
    assert "layer 2 (now attn_linear+ffn_linear)" in text.output and "counted from the config" in text.output


def test_config_only_count_equals_the_weights_count(tmp_path):
    from pathlib import Path

    loaded = info_json("tiny-random-llama")  # read from its safetensors
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(Path(loaded["source"]) / "config.json", folder / "config.json")
    config_only = info_json(folder)
    assert config_only["params"] == loaded["params"] and config_only["layers"] == loaded["layers"]


def test_costing_errors(tmp_path):
    folder = config_folder(tmp_path, LLAMA_31_8B)
    result = invoke("model", "info", str(folder), "--set", "scenario.batch_size=8")
    assert result.exit_code == 2 and "needs a cost model" in result.output
    result = invoke("model", "info", str(folder), "--cost-model", "h200x")
    assert result.exit_code == 2 and "h100" in result.output
    result = invoke("model", "info", str(folder), "--cost-model", "h100", "--set", "scenario.gpus=3",
                    "--set", "scenario.tensor_parallel=2")
    assert result.exit_code == 2 and "multiple of tensor_parallel" in result.output
    result = invoke("model", "info", str(folder), "--cost-model", "h100", "--set", "scenario.batch=8")
    assert result.exit_code == 2 and "batch_size" in result.output
