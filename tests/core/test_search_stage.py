"""The ``search`` pipeline stage: solution files, their index, and the frontier sweep."""

from __future__ import annotations

import json

import pytest

from puzzle_core.config import structure
from puzzle_core.pipeline import run_pipeline
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.schema import PuzzleConfig
from puzzle_core.search import Solution
from puzzle_core.stages.assemble import chosen_blocks, predicted_speedup, read_solutions

NUM_LAYERS = 6
BLOCKS = [  # parent first, as the library stage lists it
    ("attn_g1+ffn_64", 10.0, 0.0),
    ("attn_g3+ffn_64", 8.0, 0.05),
    ("attn_g1+ffn_32", 7.0, 0.1),
    ("attn_noop+ffn_64", 5.0, 0.4),
    ("attn_g1+ffn_noop", 4.0, 0.6),
    ("attn_noop+ffn_noop", 0.5, 3.0),
]


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the library, score and cost stages leave it."""
    root = tmp_path / "run"
    layers = {f"layer_{i}": BLOCKS for i in range(NUM_LAYERS)}
    atomic_write_json(root / "library" / "index.json", {"layers": [{"blocks": [b for b, _, _ in BLOCKS]} for _ in layers]})
    atomic_write_json(
        root / "scores" / "scores.json",
        {key: {b: {"kl": kl * (1 + i)} for b, _, kl in blocks} for i, (key, blocks) in enumerate(layers.items())},
    )
    atomic_write_json(
        root / "costs" / "costs.json",
        {
            "scenario": {"batch_size": 1, "prefill_len": 32, "decode_len": 8},
            "fixed": {"runtime_ms": 5.0, "memory_mib": 10.0, "num_params": 1000},
            "layers": {
                key: {b: {"runtime_ms": r, "memory_mib": 2 * r, "num_params": int(100 * r)} for b, r, _ in blocks}
                for key, blocks in layers.items()
            },
        },
    )
    return root


def _config(**search) -> PuzzleConfig:
    return structure({"search": search}, PuzzleConfig)


def _run(config: PuzzleConfig, root) -> list[str]:
    messages: list[str] = []
    run_pipeline(config, root, stages=["search"], echo=messages.append)
    return messages


def test_search_stage_writes_solutions_index_and_frontier(run_dir):
    config = _config(
        solver="mip",
        speedup=2.0,
        num_solutions=2,
        min_diversity=2,
        baselines=["greedy", "max_params"],
        speedups=[1.25, 1.5, 2.0, 3.0],
        layers=[{"layers": [0, -1], "keep_attention": True}],
    )
    _run(config, run_dir)
    out = run_dir / "solutions"
    index = json.loads((out / "index.json").read_text())
    assert [e["name"] for e in index["solutions"]] == ["mip", "mip_1", "greedy", "max_params"]
    assert [e["main"] for e in index["solutions"]] == [True, True, False, False]
    assert index["constraints"] == ["stats.runtime_ms<=32.5"]  # (5 + 6 * 10) / 2, fixed costs included
    assert index["parent"]["objective_value"] == 0.0 and index["parent"]["totals"]["stats.runtime_ms"] == 65.0

    solutions = {e["name"]: Solution.from_json(json.loads((out / e["file"]).read_text())) for e in index["solutions"]}
    for name, solution in solutions.items():
        assert solution.totals["stats.runtime_ms"] <= 32.5
        assert not solution.chosen["layer_0"].startswith("attn_noop")
        assert not solution.chosen[f"layer_{NUM_LAYERS - 1}"].startswith("attn_noop")
    assert solutions["mip"].objective_value <= solutions["greedy"].objective_value
    assert solutions["mip"].objective_value <= solutions["max_params"].objective_value
    assert sum(solutions["mip"].chosen[k] != solutions["mip_1"].chosen[k] for k in solutions["mip"].chosen) >= 2

    # the assemble stage reads these files as they are
    root = RunDir(run_dir)
    (name, first), *_ = read_solutions(root)
    blocks = chosen_blocks(first, NUM_LAYERS)
    assert name == "mip" and blocks == [solutions["mip"].chosen[f"layer_{i}"] for i in range(NUM_LAYERS)]
    assert predicted_speedup(root, blocks) == pytest.approx(65.0 / solutions["mip"].totals["stats.runtime_ms"])

    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["parent"]["throughput"] == pytest.approx(1000 * 8 / 65.0)
    mip_points = [p for p in frontier["points"] if p["solver"] == "mip"]
    assert [p["target_speedup"] for p in mip_points] == [1.25, 1.5, 2.0, 3.0]
    assert all(p["speedup"] >= p["target_speedup"] - 1e-9 for p in mip_points)
    values = [p["objective_value"] for p in mip_points]
    assert values == sorted(values)  # a tighter budget never scores better
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_stage_is_skipped_when_done_and_cleans_up_after_a_change(run_dir):
    config = _config(speedup=1.5, num_solutions=3, min_diversity=1)
    _run(config, run_dir)
    assert sorted(p.name for p in (run_dir / "solutions").iterdir()) == ["index.json", "mip.json", "mip_1.json", "mip_2.json"]
    assert any("done, skipped" in m for m in _run(config, run_dir))
    _run(_config(speedup=1.5), run_dir)
    assert sorted(p.name for p in (run_dir / "solutions").iterdir()) == ["index.json", "mip.json"]


def test_infeasible_budget_stops_the_stage_with_a_clear_error(run_dir):
    from puzzle_core.search import InfeasibleError

    with pytest.raises(InfeasibleError, match="the smallest achievable total is 8"):
        _run(_config(speedup=20.0), run_dir)  # 65 / 20 = 3.25 ms, but fixed 5 + 6 * 0.5 = 8 at least


def test_throughput_constraint_uses_the_scenario(run_dir):
    _run(_config(constraints=["throughput>=200 tokens/s"]), run_dir)  # 8 tokens in <= 40 ms
    solution = json.loads((run_dir / "solutions" / "mip.json").read_text())
    assert solution["totals"]["stats.runtime_ms"] <= 40.0


def test_every_stage_starts_on_the_configured_threads(run_dir, monkeypatch):
    """A plugin's native library may change the process-wide thread count (CBC sets OpenMP's);
    the stages after it must still run on ``threads``."""
    import torch

    from puzzle_core import pipeline

    seen: list[int] = []
    real_runner = pipeline.Stage.runner

    def runner(stage):
        if stage.name != "search":
            return lambda ctx: seen.append(torch.get_num_threads()) or []
        search = real_runner(stage)

        def search_then_change_threads(ctx):
            outputs = search(ctx)
            torch.set_num_threads(1)  # as CBC's optimize does to OpenMP
            return outputs

        return search_then_change_threads

    monkeypatch.setattr(pipeline.Stage, "runner", runner)
    previous = torch.get_num_threads()
    try:
        run_pipeline(structure({"threads": 2, "search": {"speedup": 1.5}}, PuzzleConfig), run_dir,
                     stages=["search", "assemble"], echo=lambda _: None)
    finally:
        torch.set_num_threads(previous)
    assert seen == [2]
