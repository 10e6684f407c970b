"""Analytic cost models (h100, rtx4090, the example a100) and the cost stage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.config import structure
from puzzle_core.errors import UserError
from puzzle_core.interfaces import ModelShape, ProcessRole
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.schema import PuzzleConfig, Scenario
from puzzle_core.roofline import GPUSpec, RooflineCostModel
from puzzle_plugins.roofline import H100_SXM

RUNTIME_KEYS = ("runtime_ms", "prefill_ms", "decode_ms")
SIZE_KEYS = ("memory_mib", "num_params")


def llama_shape(hidden=64, layers=3, heads=8, kv=4, intermediate=256, vocab=1000, tie=True) -> ModelShape:
    parent = BlockSpec(AttentionSpec(n_heads_in_group=heads // kv), FFNSpec(intermediate_size=intermediate))
    return ModelShape("llama", layers, hidden, heads, kv, hidden // heads, intermediate, vocab, tie, (parent,) * layers)


SHAPE = llama_shape()
LLAMA_70B = llama_shape(hidden=8192, layers=80, heads=64, kv=8, intermediate=28672, vocab=128256, tie=False)


def block(text: str) -> BlockSpec:
    return BlockSpec.parse(text)


@pytest.fixture(params=["h100", "rtx4090"])
def roofline(request, registries):
    return registries.cost_models.get(request.param).create()


scenarios = st.builds(
    Scenario,
    batch_size=st.integers(1, 64),
    prefill_len=st.integers(1, 4096),
    decode_len=st.integers(1, 300),
    dtype=st.sampled_from(["fp32", "bf16", "fp8"]),
    kv_dtype=st.sampled_from(["fp32", "bf16", "fp8"]),
)


@settings(max_examples=25, deadline=None)
@given(scenario=scenarios, gpu=st.sampled_from(["h100", "rtx4090"]))
def test_smaller_blocks_never_cost_more(scenario, gpu):
    from puzzle_core.registry import get_registries

    model = get_registries().cost_models.get(gpu).create()
    ffns = ["ffn_256", "ffn_192", "ffn_128", "ffn_64", "ffn_noop"]
    attentions = ["attn_g2", "attn_g4", "attn_g8", "attn_noop"]  # 4, 2, 1, 0 KV heads
    for attention in attentions:
        costs = [model.block_costs(SHAPE, block(f"{attention}+{f}"), scenario, None) for f in ffns]
        for bigger, smaller in zip(costs, costs[1:]):
            for key in RUNTIME_KEYS + SIZE_KEYS + ("ffn_intermediate_size",):
                assert smaller[key] <= bigger[key], (attention, key)
    for ffn in ffns:
        costs = [model.block_costs(SHAPE, block(f"{a}+{ffn}"), scenario, None) for a in attentions]
        for bigger, smaller in zip(costs, costs[1:]):
            for key in RUNTIME_KEYS + SIZE_KEYS + ("num_kv_heads",):
                assert smaller[key] <= bigger[key], (ffn, key)


def test_no_op_block_costs_nothing(roofline):
    costs = roofline.block_costs(SHAPE, block("attn_noop+ffn_noop"), Scenario(), None)
    assert {k: costs[k] for k in RUNTIME_KEYS + SIZE_KEYS} == dict.fromkeys(RUNTIME_KEYS + SIZE_KEYS, 0)
    assert costs["num_kv_heads"] == 0 and costs["ffn_intermediate_size"] == 0


def test_linear_replacements_cost_less_than_the_parent_but_more_than_nothing(roofline):
    parent = roofline.block_costs(SHAPE, SHAPE.blocks[0], Scenario(), None)
    for text in ("attn_linear+ffn_256", "attn_g2+ffn_linear", "attn_linear+ffn_linear"):
        costs = roofline.block_costs(SHAPE, block(text), Scenario(), None)
        assert 0 < costs["runtime_ms"] < parent["runtime_ms"]
        assert costs["num_params"] < parent["num_params"]


def test_memory_includes_the_kv_cache_and_grows_with_batch_and_length(roofline):
    parent, no_attention = SHAPE.blocks[0], block("attn_noop+ffn_256")
    base = Scenario(batch_size=2, prefill_len=64, decode_len=32, kv_dtype="bf16")
    costs = roofline.block_costs(SHAPE, parent, base, None)
    kv_bytes = 2 * 2 * (64 + 32) * SHAPE.num_key_value_heads * SHAPE.head_dim * 2
    assert costs["kv_cache_mib"] * 2**20 == pytest.approx(kv_bytes)
    assert costs["memory_mib"] * 2**20 == pytest.approx(costs["num_params"] * 2 + kv_bytes)
    for bigger in (
        Scenario(batch_size=4, prefill_len=64, decode_len=32),
        Scenario(batch_size=2, prefill_len=128, decode_len=32),
        Scenario(batch_size=2, prefill_len=64, decode_len=64),
    ):
        assert roofline.block_costs(SHAPE, parent, bigger, None)["memory_mib"] > costs["memory_mib"]
        assert (
            roofline.block_costs(SHAPE, no_attention, bigger, None)["memory_mib"]
            == roofline.block_costs(SHAPE, no_attention, base, None)["memory_mib"]
        )
    smaller_cache = roofline.block_costs(SHAPE, parent, Scenario(batch_size=2, prefill_len=64, decode_len=32, kv_dtype="fp8"), None)
    assert smaller_cache["kv_cache_mib"] == pytest.approx(costs["kv_cache_mib"] / 2)


def test_fixed_costs_are_the_embedding_and_head_only(roofline):
    scenario = Scenario(batch_size=4, prefill_len=32, decode_len=16, dtype="bf16")
    tied = roofline.fixed_costs(SHAPE, scenario, None)
    untied = roofline.fixed_costs(llama_shape(tie=False), scenario, None)
    assert tied["num_params"] == 1000 * 64 + 64
    assert untied["num_params"] == 2 * 1000 * 64 + 64
    assert tied["memory_mib"] * 2**20 == pytest.approx(tied["num_params"] * 2)
    assert tied["runtime_ms"] == pytest.approx(tied["prefill_ms"] + tied["decode_ms"]) and tied["decode_ms"] > 0
    parent = roofline.block_costs(SHAPE, SHAPE.blocks[0], scenario, None)
    assert parent["num_params"] == 64 + 64 * 64 + 2 * 64 * 4 * 8 + 64 * 64 + 64 + 3 * 64 * 256  # no vocabulary


def test_decode_of_a_big_model_is_bandwidth_bound():
    """Batch-1 decode reads every weight once per step: time = bytes / (bandwidth * efficiency)."""
    model = RooflineCostModel(H100_SXM)
    scenario = Scenario(batch_size=1, prefill_len=16, decode_len=101, dtype="bf16", kv_dtype="bf16")
    costs = model.block_costs(LLAMA_70B, LLAMA_70B.blocks[0], scenario, None)
    weights_ms = costs["num_params"] * 2 / (H100_SXM.bandwidth_gbs * 1e9 * 0.85) * 1e3
    assert costs["decode_ms"] / 100 == pytest.approx(weights_ms, rel=0.05)
    assert costs["prefill_ms"] < costs["decode_ms"] / 100 * 1.5  # 16 tokens still ride on one weight read


def test_fp8_halves_weight_memory_and_speeds_up_decode():
    model = RooflineCostModel(H100_SXM)
    bf16 = model.block_costs(LLAMA_70B, LLAMA_70B.blocks[0], Scenario(dtype="bf16", kv_dtype="fp8"), None)
    fp8 = model.block_costs(LLAMA_70B, LLAMA_70B.blocks[0], Scenario(dtype="fp8", kv_dtype="fp8"), None)
    assert fp8["memory_mib"] - fp8["kv_cache_mib"] == pytest.approx((bf16["memory_mib"] - bf16["kv_cache_mib"]) / 2)
    assert fp8["decode_ms"] < 0.6 * bf16["decode_ms"]


def test_dtype_missing_from_the_spec_sheet_is_a_user_error():
    no_fp8 = GPUSpec(name="Old GPU", memory_gib=16, bandwidth_gbs=900, peak_tflops={"fp32": 15.7, "bf16": 125.0})
    with pytest.raises(UserError, match="no fp8 throughput"):
        RooflineCostModel(no_fp8).block_costs(SHAPE, SHAPE.blocks[0], Scenario(dtype="fp8"), None)


def test_the_spec_sheet_check_names_what_the_scenario_needs():
    no_fp8 = RooflineCostModel(GPUSpec("Old GPU", memory_gib=16, bandwidth_gbs=900, peak_tflops={"fp32": 15.7, "bf16": 125.0}))
    assert no_fp8.check_scenario(Scenario(dtype="bf16", kv_dtype="fp8")) == []  # fp8 KV cache only changes bytes
    (problem,) = no_fp8.check_scenario(Scenario(dtype="fp8"))
    assert "no fp8 throughput" in problem and "supports bf16, fp32" in problem
    fp32_only = RooflineCostModel(GPUSpec("CPU-ish", memory_gib=16, bandwidth_gbs=100, peak_tflops={"fp32": 1.0}))
    (problem,) = fp32_only.check_scenario(Scenario(dtype="fp8"))  # fp8 GEMMs with bf16 attention
    assert "no bf16 or fp8 throughput" in problem


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"peak_tflops": {"fp16": 100.0, "bf16": 100.0}}, "'fp16', which no scenario can ask for; scenario dtypes are fp32, bf16, fp8"),
        ({"peak_tflops": {"bf16": 0.0}}, "positive TFLOPS"),
        ({"peak_tflops": {}}, "positive TFLOPS"),
        ({"memory_gib": 0}, "memory_gib must be positive"),
        ({"bandwidth_gbs": -1.0}, "bandwidth_gbs must be positive"),
    ],
)
def test_a_spec_sheet_a_scenario_could_never_use_is_refused_when_made(fields, problem):
    with pytest.raises(ValueError, match=problem):
        GPUSpec(**{"name": "X", "memory_gib": 16, "bandwidth_gbs": 900, "peak_tflops": {"bf16": 100.0}, **fields})


def test_bad_grouping_and_bad_options_are_user_errors(registries):
    with pytest.raises(UserError, match="does not divide"):
        RooflineCostModel(H100_SXM).block_costs(SHAPE, block("attn_g3+ffn_256"), Scenario(), None)
    with pytest.raises(UserError, match="gemm_compute_efficiency"):
        structure({"costs": {"model": {"name": "h100", "gemm_compute_efficiency": 1.5}}}, PuzzleConfig)
    with pytest.raises(UserError, match="batch_size"):
        structure({"scenario": {"batch_size": 0}}, PuzzleConfig)


def test_example_plugin_adds_an_a100_through_its_entry_point(registries):
    pytest.importorskip("puzzle_example_plugin", reason="pip install -e examples/puzzle-example-plugin")
    entry = registries.cost_models.entry("a100")
    assert entry.distribution == "puzzle-example-plugin"
    a100, h100 = entry.record.create(), registries.cost_models.get("h100").create()
    scenario = Scenario(batch_size=8, prefill_len=512, decode_len=64, dtype="bf16")
    assert a100.block_costs(LLAMA_70B, LLAMA_70B.blocks[0], scenario, None)["runtime_ms"] > (
        h100.block_costs(LLAMA_70B, LLAMA_70B.blocks[0], scenario, None)["runtime_ms"]
    )
    with pytest.raises(UserError, match="A100"):
        a100.block_costs(SHAPE, SHAPE.blocks[0], Scenario(dtype="fp8"), None)


# ---------------------------------------------------------------- the cost stage


def cost_context(tmp_path, registries, shape: ModelShape, blocks_per_layer, **config):
    run_dir = RunDir(tmp_path)
    atomic_write_json(run_dir.path("library", "index.json"), {"layers": [{"blocks": b} for b in blocks_per_layer]})
    return SimpleNamespace(
        config=structure(config, PuzzleConfig),
        run_dir=run_dir,
        parent=SimpleNamespace(shape=shape),
        family=None,
        registries=registries,
        role=ProcessRole(),
    )


def test_cost_stage_writes_costs_once_per_distinct_block_and_refreshes_the_view(tmp_path, registries, monkeypatch):
    from puzzle_core.stages import cost

    offered = ["attn_g2+ffn_256", "attn_g8+ffn_64", "attn_noop+ffn_noop"]
    ctx = cost_context(
        tmp_path, registries, SHAPE, [offered] * 3, costs={"model": "h100"}, scenario={"batch_size": 2, "decode_len": 8}
    )
    calls = []
    original = RooflineCostModel.block_costs
    monkeypatch.setattr(
        RooflineCostModel, "block_costs", lambda self, *a: calls.append(a[1].id) or original(self, *a)
    )
    outputs = cost.run(ctx)
    assert outputs == [tmp_path / "costs" / "costs.json"]
    assert sorted(calls) == sorted(offered)
    data = json.loads(outputs[0].read_text())
    assert data["cost_model"] == "h100" and data["scenario"]["batch_size"] == 2
    assert data["fixed"]["num_params"] == 1000 * 64 + 64
    assert list(data["layers"]) == ["layer_0", "layer_1", "layer_2"]
    assert data["layers"]["layer_1"]["attn_noop+ffn_noop"]["runtime_ms"] == 0
    assert data["memory_check"]["parent_fits"] and data["memory_check"]["smallest_child_fits"]
    view = json.loads((tmp_path / "library" / "library.json").read_text())
    assert view["layer_2"]["attn_g8+ffn_64"]["stats"] == data["layers"]["layer_2"]["attn_g8+ffn_64"]


def test_cost_stage_refuses_a_scenario_no_child_fits(tmp_path, registries):
    from puzzle_core.stages import cost

    ctx = cost_context(
        tmp_path,
        registries,
        LLAMA_70B,
        [["attn_g8+ffn_28672", "attn_g64+ffn_14336"]] * 80,
        costs={"model": "rtx4090"},
        scenario={"batch_size": 1, "prefill_len": 128, "decode_len": 128, "dtype": "bf16"},
    )
    with pytest.raises(UserError, match="smallest child"):
        cost.run(ctx)
    assert not (tmp_path / "costs" / "costs.json").exists()


def test_cost_stage_needs_the_library_index(tmp_path, registries):
    from puzzle_core.stages import cost

    ctx = cost_context(tmp_path, registries, SHAPE, [["attn_g2+ffn_256"]], costs={"model": "h100"})
    (tmp_path / "library" / "index.json").unlink()
    with pytest.raises(UserError, match="--stage library"):
        cost.run(ctx)
