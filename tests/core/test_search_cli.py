"""``puzzle search`` on library files and run directories."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from puzzle_core.cli import cli
from puzzle_core.rundir import atomic_write_json

SOLUTION_KEYS = ["solver", "status", "gap", "objective_value", "chosen", "totals", "solve_seconds"]


def _library(num_layers: int = 4) -> dict:
    """Per layer: the parent and three cheaper blocks that cost more KL."""
    blocks = [("attn_g1+ffn_64", 10, 0.0), ("attn_g2+ffn_32", 6, 0.2), ("attn_g1+ffn_noop", 4, 0.5), ("attn_noop+ffn_noop", 1, 2.0)]
    return {
        f"layer_{i}": {
            name: {"stats": {"runtime_ms": r, "memory_mib": 100.0 * r, "num_params": 1000 * r}, "metrics": {"kl_div": kl * (1 + i / 10)}}
            for name, r, kl in blocks
        }
        for i in range(num_layers)
    }


@pytest.fixture
def library_file(tmp_path):
    path = tmp_path / "library.json"
    path.write_text(json.dumps(_library()))
    return str(path)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["search", *args])


def test_json_output_has_a_stable_shape(library_file, tmp_path):
    out = tmp_path / "child.json"
    result = invoke(
        library_file, "--objective", "metrics.kl_div", "--minimize", "--constraint", "stats.memory_mib<=3000",
        "--constraint", "stats.runtime_ms<=28", "--json", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == SOLUTION_KEYS
    assert data["solver"] == "mip" and data["status"] == "optimal" and data["gap"] <= 1e-3
    assert list(data["chosen"]) == [f"layer_{i}" for i in range(4)]
    assert data["totals"]["stats.runtime_ms"] <= 28 and data["totals"]["stats.memory_mib"] <= 3000
    assert set(data["totals"]) == {"stats.memory_mib", "stats.runtime_ms", "metrics.kl_div", "stats.num_params"}
    assert json.loads(out.read_text()) == data  # what `puzzle model assemble --blocks` reads


def test_several_solutions_print_a_list_that_respects_diversity(library_file, tmp_path):
    out = tmp_path / "child.json"
    result = invoke(
        library_file, "--objective", "metrics.kl_div", "--constraint", "stats.runtime_ms<=30",
        "--num-solutions", "3", "--min-diversity", "2", "--json", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == 3 and all(list(s) == SOLUTION_KEYS for s in data)
    for a in range(3):
        for b in range(a + 1, 3):
            assert sum(data[a]["chosen"][k] != data[b]["chosen"][k] for k in data[a]["chosen"]) >= 2
    assert [json.loads(p.read_text()) for p in (out, tmp_path / "child_1.json", tmp_path / "child_2.json")] == data


def test_readable_table_lists_layers_and_totals(library_file):
    result = invoke(library_file, "--objective", "metrics.kl_div", "--constraint", "stats.runtime_ms<=28", "--solver", "greedy")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "parent", "greedy"]
    assert lines[1].split()[:2] == ["layer_0", "attn_g1+ffn_64"]
    assert any(line.startswith("stats.runtime_ms  [stats.runtime_ms<=28]") for line in lines)
    assert any(line.split()[:2] == ["status", "feasible"] for line in lines)


def test_infeasible_constraints_exit_2_with_the_reachable_minimum(library_file):
    result = invoke(library_file, "--objective", "metrics.kl_div", "--constraint", "stats.runtime_ms<=3")
    assert result.exit_code == 2
    assert "stats.runtime_ms<=3: the smallest achievable total is 4, so it can never hold" in result.stderr
    assert "Traceback" not in result.output


def test_unknown_solver_suggests_the_closest(library_file):
    result = invoke(library_file, "--objective", "metrics.kl_div", "--solver", "gredy")
    assert result.exit_code == 2
    assert "Did you mean 'greedy'?" in result.stderr


def test_options_a_solver_lacks_are_refused(library_file):
    result = invoke(library_file, "--objective", "metrics.kl_div", "--solver", "greedy", "--gap", "0.01")
    assert result.exit_code == 2
    assert "gap" in result.stderr and "unknown key" in result.stderr


def test_ranges_and_maximize(library_file):
    result = invoke(library_file, "--objective", "stats.num_params", "--maximize", "--constraint", "20<=stats.runtime_ms<=25",
                    "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["totals"]["stats.runtime_ms"] == 25 and data["objective_value"] == 25000


def test_run_directory_adds_fixed_costs_and_the_scenario(tmp_path):
    run = tmp_path / "run"
    library = _library(2)
    atomic_write_json(run / "library" / "index.json", {"layers": [{"blocks": list(layer)} for layer in library.values()]})
    atomic_write_json(
        run / "scores" / "scores.json",
        {key: {block: record["metrics"] for block, record in layer.items()} for key, layer in library.items()},
    )
    atomic_write_json(
        run / "costs" / "costs.json",
        {
            "scenario": {"batch_size": 2, "prefill_len": 16, "decode_len": 10},
            "fixed": {"runtime_ms": 4.0, "memory_mib": 50.0, "num_params": 500},
            "layers": {key: {block: record["stats"] for block, record in layer.items()} for key, layer in library.items()},
        },
    )
    # 20 generated tokens at >= 1000 tokens/s: whole-model runtime <= 20 ms, 16 ms for the layers
    result = invoke(str(run), "--objective", "metrics.kl_div", "--constraint", "throughput>=1000 tokens/s", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chosen"] == {"layer_0": "attn_g2+ffn_32", "layer_1": "attn_g1+ffn_64"}  # layer 0 is less sensitive
    assert data["totals"]["stats.runtime_ms"] == 20.0 and data["totals"]["stats.memory_mib"] == 1650.0
