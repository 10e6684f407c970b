"""The ``measured`` cost model on tiny random Llama blocks (CPU, one thread)."""

from __future__ import annotations

import attrs
import pytest

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.errors import UserError
from puzzle_core.interfaces import ModelShape
from puzzle_core.schema import Scenario
from puzzle_core.roofline import block_params, fixed_params, kv_cache_bytes
from puzzle_plugins.measured_cost import MeasuredCostModel, MeasuredOptions, NoisyCostWarning

SHAPE = ModelShape(
    "llama", 2, 64, 4, 2, 16, 128, 256, True,
    (BlockSpec(AttentionSpec(n_heads_in_group=2), FFNSpec(intermediate_size=128)),) * 2,
)
SCENARIO = Scenario(batch_size=2, prefill_len=16, decode_len=5, dtype="fp32", kv_dtype="fp32", threads=1)


def scenario(**changes) -> Scenario:
    fields = {"batch_size": 2, "prefill_len": 16, "decode_len": 5, "dtype": "fp32", "kv_dtype": "fp32", "threads": 1}
    return Scenario(**{**fields, **changes})


@pytest.fixture
def family(registries):
    return registries.architectures.get("llama").create()


@pytest.fixture
def measured(tmp_path):
    return MeasuredCostModel(MeasuredOptions(layers=2, warmup=1, repeats=3, cache_dir=str(tmp_path)))


def test_second_call_hits_the_disk_cache(measured, family, tmp_path):
    block = BlockSpec.parse("attn_g4+ffn_64")
    first = measured.block_costs(SHAPE, block, SCENARIO, family)
    assert measured.measured == 1 and len(list(tmp_path.glob("*.json"))) == 1
    again = MeasuredCostModel(measured.options)  # a new process would start like this
    assert again.block_costs(SHAPE, block, SCENARIO, family) == first
    assert again.measured == 0
    again.block_costs(SHAPE, block, scenario(batch_size=1), family)
    assert again.measured == 1  # another scenario is another measurement


def test_counts_match_the_architecture_and_fixed_costs_are_separate(measured, family):
    for text in ("attn_g2+ffn_128", "attn_g4+ffn_32", "attn_linear+ffn_linear", "attn_noop+ffn_64"):
        block = BlockSpec.parse(text)
        costs = measured.block_costs(SHAPE, block, SCENARIO, family)
        kv_bytes = kv_cache_bytes(SHAPE, block.attention, SCENARIO)
        assert costs["num_params"] == block_params(SHAPE, block), text
        assert costs["kv_cache_mib"] * 2**20 == pytest.approx(kv_bytes)
        assert costs["memory_mib"] * 2**20 == pytest.approx(costs["num_params"] * 4 + kv_bytes)
        assert costs["runtime_ms"] == pytest.approx(costs["prefill_ms"] + costs["decode_ms"])
        assert costs["runtime_ms"] >= 0  # tiny blocks: a paired difference near the noise, clipped at 0
    fixed = measured.fixed_costs(SHAPE, SCENARIO, family)
    assert fixed["num_params"] == fixed_params(SHAPE) and fixed["kv_cache_mib"] == 0
    assert fixed["prefill_ms"] > 0 and fixed["decode_ms"] > 0


def test_no_op_block_costs_nothing(measured, family):
    costs = measured.block_costs(SHAPE, BlockSpec.parse("attn_noop+ffn_noop"), SCENARIO, family)
    assert costs["runtime_ms"] == 0 and costs["memory_mib"] == 0 and costs["num_params"] == 0
    assert measured.measured == 0


def test_kv_cache_memory_grows_with_batch_and_length(measured, family):
    parent = SHAPE.blocks[0]
    base = measured.block_costs(SHAPE, parent, SCENARIO, family)["kv_cache_mib"]
    assert measured.block_costs(SHAPE, parent, scenario(batch_size=4), family)["kv_cache_mib"] == pytest.approx(2 * base)
    longer = scenario(prefill_len=37, decode_len=16)  # 53 positions instead of 21
    assert measured.block_costs(SHAPE, parent, longer, family)["kv_cache_mib"] == pytest.approx(53 / 21 * base)


def test_a_much_smaller_block_is_measured_faster(family):
    shape = ModelShape("llama", 1, 256, 8, 8, 32, 2048, 256, True,
                       (BlockSpec(AttentionSpec(n_heads_in_group=1), FFNSpec(intermediate_size=2048)),))
    workload = scenario(batch_size=4, prefill_len=64, decode_len=3)
    model = MeasuredCostModel(MeasuredOptions(layers=2, repeats=5, cache=False))
    big = model.block_costs(shape, shape.blocks[0], workload, family)
    small = model.block_costs(shape, BlockSpec.parse("attn_g8+ffn_64"), workload, family)
    assert small["prefill_ms"] < big["prefill_ms"]
    assert small["num_params"] < big["num_params"] and small["memory_mib"] < big["memory_mib"]


def test_inputs_it_cannot_measure_are_user_errors(measured, family):
    with pytest.raises(UserError, match="dtype 'fp8'"):
        measured.block_costs(SHAPE, SHAPE.blocks[0], scenario(dtype="fp8", kv_dtype="fp8"), family)
    with pytest.raises(UserError, match="kv_dtype"):
        measured.block_costs(SHAPE, SHAPE.blocks[0], scenario(kv_dtype="bf16"), family)
    with pytest.raises(UserError, match="model family"):
        measured.fixed_costs(SHAPE, SCENARIO, None)


def test_process_clock_is_a_separate_measurement(tmp_path, family):
    wall = MeasuredCostModel(MeasuredOptions(layers=1, repeats=1, cache_dir=str(tmp_path)))
    process = MeasuredCostModel(attrs.evolve(wall.options, clock="process"))
    fixed = process.fixed_costs(SHAPE, SCENARIO, family)
    assert fixed["prefill_ms"] > 0 and fixed["decode_ms"] > 0
    wall.fixed_costs(SHAPE, SCENARIO, family)
    assert wall.measured == 1 and len(list(tmp_path.glob("*.json"))) == 2


class RoundClock:
    """Fake time that passes only in forward calls: ``1 + 0.5 x layers`` units each, times the current
    round's slowdown; the slowdown changes every ``round_calls`` calls (a machine whose load keeps changing)."""

    SLOWDOWNS = (7.0, 1.0, 3.0, 1.5, 4.0, 2.0)  # the first round is the warm-up

    def __init__(self, round_calls: int):
        self.time, self.calls, self.round_calls = 0.0, 0, round_calls

    def now(self) -> float:
        return self.time

    def charge(self, layers: int):
        def hook(_module, _args, _output):
            self.time += (1 + 0.5 * layers) * self.SLOWDOWNS[self.calls // self.round_calls]
            self.calls += 1
        return hook


def timed_on(clock: RoundClock, family, monkeypatch, **options) -> dict:
    """One block's costs measured on ``clock`` instead of the machine's."""
    import puzzle_core.timing as timing

    monkeypatch.setitem(timing.CLOCKS, "wall", clock.now)
    build = family.random_model

    def timed_model(shape, dtype="float32"):
        model = build(shape, dtype)
        model.register_forward_hook(clock.charge(shape.num_layers))
        return model

    monkeypatch.setattr(family, "random_model", timed_model)
    model = MeasuredCostModel(MeasuredOptions(layers=4, warmup=1, repeats=5, cache=False, **options))
    return model.block_costs(SHAPE, BlockSpec.parse("attn_g4+ffn_64"), SCENARIO, family)


def test_block_cost_is_the_median_paired_difference_of_interleaved_generate_runs(family, monkeypatch):
    import statistics

    decode = SCENARIO.decode_len  # forward calls per generate(): the prefill and decode - 1 steps
    clock = RoundClock(round_calls=2 * decode)
    with pytest.warns(NoisyCostWarning, match=r"block attn_g4\+ffn_64 .* differ by 112%"):
        costs = timed_on(clock, family, monkeypatch)
    assert clock.calls == 6 * 2 * decode  # a warm-up round and 5 timed ones, both models in each
    # per round: the 4-layer model's extra 0.5 x 4 units per call, over 4 layers; median over the timed rounds
    per_call = statistics.median(0.5 * s for s in RoundClock.SLOWDOWNS[1:]) * 1e3
    assert costs["runtime_ms"] == pytest.approx(per_call * decode)
    assert costs["prefill_ms"] == pytest.approx(per_call)  # the first forward call of each generate()
    assert costs["decode_ms"] == pytest.approx(per_call * (decode - 1))
    # the rounds' slowdowns 1, 1.5, 2, 3, 4: quartiles 1.25 and 3.5 around a median of 2
    assert costs["runtime_spread"] == pytest.approx((3.5 - 1.25) / 2)


def test_rounds_that_agree_give_no_spread_and_no_warning(family, monkeypatch):
    import warnings

    monkeypatch.setattr(RoundClock, "SLOWDOWNS", (7.0, 2.0, 2.0, 2.0, 2.0, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoisyCostWarning)
        costs = timed_on(RoundClock(round_calls=2 * SCENARIO.decode_len), family, monkeypatch)
    assert costs["runtime_spread"] == pytest.approx(0.0, abs=1e-9) and costs["runtime_ms"] > 0
