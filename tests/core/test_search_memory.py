"""The search bounds memory by the device's (search.fit_memory) and reports each child's largest batch."""

from __future__ import annotations

import json

import pytest

from puzzle_core.config import structure
from puzzle_core.pipeline import run_pipeline
from puzzle_core.rundir import atomic_write_json
from puzzle_core.schema import PuzzleConfig, check_config

# tiny-random-llama: 4 layers, hidden 64, 4 heads of 16, 2 KV heads, FFN 128, vocab 256 (parent block first)
BLOCKS = [  # id, runtime_ms, memory_mib, kl
    ("attn_g2+ffn_128", 10.0, 40.0, 0.0),
    ("attn_g4+ffn_128", 9.0, 25.0, 0.1),
    ("attn_noop+ffn_128", 6.0, 8.0, 0.5),
    ("attn_noop+ffn_noop", 0.5, 0.0, 3.0),
]
LAYERS = 4
SCENARIO = {"batch_size": 1, "prefill_len": 32760, "decode_len": 8, "dtype": "fp32", "kv_dtype": "fp32"}


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the library, score and cost stages leave it, with a device of 100 MiB."""
    root = tmp_path / "run"
    layers = {f"layer_{i}": BLOCKS for i in range(LAYERS)}
    atomic_write_json(root / "library" / "index.json", {"layers": [{"blocks": [b[0] for b in BLOCKS]} for _ in layers]})
    atomic_write_json(root / "scores" / "scores.json",
                      {key: {b: {"kl": kl} for b, _, _, kl in blocks} for key, blocks in layers.items()})
    atomic_write_json(root / "costs" / "costs.json", {
        "scenario": SCENARIO,
        "fixed": {"runtime_ms": 5.0, "memory_mib": 10.0, "num_params": 1000},
        "layers": {key: {b: {"runtime_ms": r, "memory_mib": m, "num_params": int(1000 * m)} for b, r, m, _ in blocks} for key, blocks in layers.items()},
        "memory_check": {"capacity_mib": 100.0, "parent_mib": 170.0, "parent_fits": False, "smallest_child_mib": 10.0,
                         "smallest_child_fits": True},
    })
    return root


def _config(**search) -> PuzzleConfig:
    return structure({"parent": {"source": "tiny-random-llama"}, "scenario": SCENARIO, "costs": {"model": "h100"},
                      "search": {"solver": "mip", "objective": "metrics.kl", **search}}, PuzzleConfig)


def _search(config, root) -> dict:
    run_pipeline(config, root, stages=["search"], echo=lambda _: None)
    return json.loads((root / "solutions" / "index.json").read_text())


def test_fit_memory_bounds_weights_and_kv_cache(run_dir):
    free = _search(_config(), run_dir)
    assert free["constraints"] == [] and free["solutions"][0]["objective_value"] == 0.0  # the parent itself
    bounded = _search(_config(fit_memory=True), run_dir)
    assert bounded["constraints"] == ["stats.memory_mib<=100"]
    chosen = json.loads((run_dir / "solutions" / "mip.json").read_text())["chosen"]
    memory = 10.0 + sum(next(m for b, _, m, _ in BLOCKS if b == block) for block in chosen.values())
    assert memory <= 100.0
    # brute force over the 4^4 children: the best KL whose memory fits
    import itertools

    best = min(sum(b[3] for b in combo) for combo in itertools.product(BLOCKS, repeat=LAYERS)
               if 10.0 + sum(b[2] for b in combo) <= 100.0)
    assert bounded["solutions"][0]["objective_value"] == pytest.approx(best)


def test_fit_memory_needs_a_device_memory(run_dir):
    from puzzle_core.errors import UserError

    costs = json.loads((run_dir / "costs" / "costs.json").read_text())
    del costs["memory_check"]
    atomic_write_json(run_dir / "costs" / "costs.json", costs)
    with pytest.raises(UserError, match="does not\\s+know the device's memory"):
        _search(_config(fit_memory=True), run_dir)


def test_largest_batch_per_child(run_dir):
    index = _search(_config(largest_batch="h100", baselines=["max_params"], speedup=2.0), run_dir)
    parent = index["parent"]["largest_batch"]
    # by hand: 90% of 80 GiB minus the fp32 weights, over one sequence's KV cache (4 layers, K and V, 2 heads of 16)
    params = 2 * 256 * 64 + 64 + 4 * (64 + 64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 + 3 * 64 * 128)
    per_sequence = 4 * 2 * 2 * 16 * (32760 + 8) * 4
    assert parent["batch_size"] == int((0.9 * 80 * 2**30 - 4 * params) // per_sequence)
    assert parent["tokens_per_s"] == pytest.approx(parent["batch_size"] * 8 / (parent["runtime_ms"] / 1e3))
    assert [e["name"] for e in index["solutions"]] == ["mip", "max_params"]
    for entry in index["solutions"]:
        chosen = json.loads((run_dir / "solutions" / entry["file"]).read_text())["chosen"]
        fitted = entry["largest_batch"]
        assert fitted["cost_model"] == "h100" and fitted["memory_mib"] <= 0.9 * 80 * 1024
        kv_layers = sum(1 for b in chosen.values() if not b.startswith("attn_noop"))
        assert kv_layers < LAYERS and fitted["batch_size"] > parent["batch_size"]  # fewer KV caches: more fits


def test_largest_batch_config_is_checked():
    from puzzle_core.errors import ConfigError

    check_config(_config(largest_batch="h100"))
    with pytest.raises(ConfigError, match="largest_batch"):
        check_config(structure({"scenario": {"tensor_parallel": 2}, "costs": {"model": "h100"},
                                "search": {"largest_batch": "measured"}}, PuzzleConfig))
