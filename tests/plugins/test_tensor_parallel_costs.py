"""Roofline cost models with tensor parallelism and several GPUs in the scenario."""

from __future__ import annotations

import attrs
import pytest

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.costing import largest_batch, model_costs
from puzzle_core.errors import UserError
from puzzle_core.interfaces import ModelShape
from puzzle_core.roofline import GPUSpec, RooflineCostModel, RooflineOptions, block_ops, Precision, block_params
from puzzle_core.scenario import Scenario

PARENT = BlockSpec(AttentionSpec(n_heads_in_group=8), FFNSpec(intermediate_size=28672))
LLAMA_70B = ModelShape(family="llama", num_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                       head_dim=128, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
                       blocks=(PARENT,) * 80)
PAPER = Scenario(batch_size=64, prefill_len=128, decode_len=1024, dtype="fp8", kv_dtype="fp8")


@pytest.fixture
def h100(registries):
    return registries.cost_models.get("h100").create()


def test_weights_and_kv_cache_split_over_the_group(h100):
    one = model_costs(h100, LLAMA_70B, PAPER)
    four = model_costs(h100, LLAMA_70B, attrs.evolve(PAPER, tensor_parallel=4))
    assert four.total("num_params") == one.total("num_params")  # the model, not a GPU's share
    # 8 KV heads over 4 GPUs: 2 each, a quarter of the cache
    assert four.kv_cache_mib == pytest.approx(one.kv_cache_mib / 4)
    # weights: a quarter, but every GPU keeps all the norms (2 x 8192 per layer, plus the final one)
    norms_mib = (80 * 2 + 1) * 8192 / 2**20  # fp8: one byte each
    assert four.weights_mib == pytest.approx((one.weights_mib - norms_mib) / 4 + norms_mib)
    assert not one.fits and four.fits  # 70B at batch 64 fits four H100s, not one


def test_kv_heads_are_replicated_when_fewer_than_the_group(h100):
    gqa = BlockSpec(AttentionSpec(n_heads_in_group=32), FFNSpec(intermediate_size=28672))  # 2 KV heads
    one = h100.block_costs(LLAMA_70B, gqa, PAPER, None)
    eight = h100.block_costs(LLAMA_70B, gqa, attrs.evolve(PAPER, tensor_parallel=8), None)
    assert eight["kv_cache_mib"] == pytest.approx(one["kv_cache_mib"] / 2)  # one of the two heads on every GPU
    assert eight["num_kv_heads"] == one["num_kv_heads"] == 2


def test_all_reduce_priced_by_hand():
    gpu = GPUSpec(name="G", memory_gib=80, bandwidth_gbs=3000, peak_tflops={"bf16": 1000.0}, interconnect_gbs=400)
    options = RooflineOptions(allreduce_efficiency=0.5, allreduce_latency_us=7.0)
    model = RooflineCostModel(gpu, options)
    p = Precision.of(Scenario())
    ops = block_ops(LLAMA_70B, PARENT, batch=16, new=1, context=200, p=p, tp=4)
    reduces = [op for op in ops if op.kind == "communication"]
    assert [op.name for op in reduces] == ["attention_all_reduce", "ffn_all_reduce"]
    # ring all-reduce of 16 x 8192 bf16 values over 4 GPUs: 2 * 3/4 of 262144 bytes through the link
    expected = 2 * 3 / 4 * 16 * 8192 * 2 / (400e9 * 0.5) + 7e-6
    assert model.op_seconds(reduces[0], p) == pytest.approx(expected)
    assert not [op for op in block_ops(LLAMA_70B, PARENT, 16, 1, 200, p, tp=1) if op.kind == "communication"]
    noop = BlockSpec(AttentionSpec(no_op=True), FFNSpec(no_op=True))
    assert block_ops(LLAMA_70B, noop, 16, 1, 200, p, tp=4) == []  # nothing to reduce


def test_without_communication_tp_divides_decode_time(h100):
    """With a free link, decode (memory-bound) takes about 1/t of the time: what remains is the norms and launches."""
    free = RooflineCostModel(attrs.evolve(h100.gpu, interconnect_gbs=1e9),
                             attrs.evolve(h100.options, allreduce_latency_us=0.0, kernel_overhead_us=0.0))
    single = free.block_costs(LLAMA_70B, PARENT, attrs.evolve(PAPER, batch_size=1), None)
    split = free.block_costs(LLAMA_70B, PARENT, attrs.evolve(PAPER, batch_size=1, tensor_parallel=4), None)
    assert split["decode_ms"] == pytest.approx(single["decode_ms"] / 4, rel=0.02)
    real = h100.block_costs(LLAMA_70B, PARENT, attrs.evolve(PAPER, batch_size=1, tensor_parallel=4), None)
    assert real["decode_ms"] > split["decode_ms"]  # the all-reduces cost something


def test_throughput_over_several_gpus(h100):
    scenario = attrs.evolve(PAPER, tensor_parallel=4, gpus=8)
    group = model_costs(h100, LLAMA_70B, attrs.evolve(scenario, gpus=4))
    node = model_costs(h100, LLAMA_70B, scenario)
    assert node.runtime_ms == pytest.approx(group.runtime_ms)  # each group serves its own batch
    assert node.tokens_per_s == pytest.approx(2 * group.tokens_per_s)
    assert node.tokens_per_s_per_gpu == pytest.approx(group.tokens_per_s_per_gpu)
    assert node.tokens_per_s == pytest.approx(2 * 64 * 1024 / (group.runtime_ms / 1e3))


def test_largest_batch_by_hand(h100):
    """Llama-3.1-70B in fp8 on one H100: (90% of 80 GiB - weights) / KV cache of one sequence."""
    weights = 70_553_706_496  # bytes: its published parameter count, one byte each
    per_sequence = (128 + 1024) * 80 * 2 * 8 * 128  # positions x layers x (K, V) x KV heads x head dim, fp8
    expected = int((0.9 * 80 * 2**30 - weights) // per_sequence)
    one = largest_batch(h100, LLAMA_70B, PAPER)
    assert one.scenario.batch_size == expected == 35
    four = largest_batch(h100, LLAMA_70B, attrs.evolve(PAPER, tensor_parallel=4))
    assert four.fits and four.scenario.batch_size > 4 * expected  # weights split too, so more than 4x the room
    assert not model_costs(h100, LLAMA_70B, attrs.evolve(four.scenario, batch_size=four.scenario.batch_size + 1)).fits


def test_tensor_parallel_problems(registries, h100):
    no_link = RooflineCostModel(GPUSpec(name="Solo", memory_gib=16, bandwidth_gbs=900, peak_tflops={"bf16": 100.0}))
    assert no_link.check_scenario(Scenario()) == []
    problems = no_link.check_scenario(Scenario(tensor_parallel=2, gpus=2))
    assert len(problems) == 1 and "interconnect_gbs" in problems[0]
    measured = registries.cost_models.get("measured").create()
    assert any("tensor_parallel" in p for p in measured.check_scenario(Scenario(dtype="fp32", kv_dtype="fp32",
                                                                                tensor_parallel=2, gpus=2)))
    with pytest.raises(UserError, match="do not\\s+split evenly"):
        h100.block_costs(LLAMA_70B, PARENT, attrs.evolve(PAPER, tensor_parallel=3, gpus=3), None)
    assert block_params(LLAMA_70B, PARENT, 1) == block_params(LLAMA_70B, PARENT)


def test_the_paper_scenario_table(registries, h100):
    """The benchmark's rows: every published row predicted, the reconstructed 51B about 51.5B parameters."""
    from benchmarks.cost_fidelity import LLAMA_31_70B, PAPER_ROWS, nemotron_51b_config, paper_table
    from puzzle_core.roofline import model_params

    family = registries.architectures.get("llama").create()
    shapes = {"llama-3.1-70b": family.shape(LLAMA_31_70B), "nemotron-51b": family.shape(nemotron_51b_config())}
    assert model_params(shapes["llama-3.1-70b"]) == 70_553_706_496  # its published parameter count
    assert model_params(shapes["nemotron-51b"]) == pytest.approx(51.5e9, rel=0.01)
    rows = paper_table(h100, shapes, PAPER, limit=1024)
    assert [(r["model"], r["tensor_parallel"]) for r in rows] == [(m, tp) for m, tp, _ in PAPER_ROWS]
    assert all(r["batch"] >= 1 and r["tokens_per_s_per_gpu"] > 0 for r in rows)
    child, parent_tp1 = rows[0], rows[1]
    assert child["batch"] > parent_tp1["batch"]  # the smaller child fits a larger batch on one GPU
    assert parent_tp1["predicted_child_speedup"] > 1 and parent_tp1["published_child_speedup"] == pytest.approx(5.08, abs=0.01)
