"""The example third-party plugin: installed like any package, listed, and usable by name."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from puzzle_core.cli import main
from puzzle_core.errors import UnknownNameError
from puzzle_core.interfaces import CostModel, Solver
from puzzle_core.library import BlockLibrary
from puzzle_core.registry import get_registries
from puzzle_core.schema import load_config
from puzzle_core.search import build_problem, run_solver

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "puzzle-example-plugin"
DISTRIBUTION = "puzzle-example-plugin"


@pytest.fixture(scope="session", autouse=True)
def example_installed():
    """The example package installed in this environment: ``make install`` does it, else it is done once here."""
    try:
        return importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(EXAMPLE)],
        check=True,
    )
    site.addsitedir(sysconfig.get_paths()["purelib"])  # run the new .pth file, as a fresh interpreter would
    importlib.invalidate_caches()
    return importlib.metadata.distribution(DISTRIBUTION)


def test_the_example_declares_one_entry_point_in_the_puzzle_group(example_installed):
    (entry_point,) = example_installed.entry_points.select(group="puzzle")
    assert (entry_point.name, entry_point.value) == ("example", "puzzle_example_plugin")
    assert "puzzle-nas" in example_installed.requires


def test_puzzle_plugins_lists_its_items_under_its_own_distribution(capsys):
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    supplied = {
        (kind, item["name"]) for kind, items in listing.items() for item in items if item["distribution"] == DISTRIBUTION
    }
    assert {("solvers", "brute_force"), ("cost_models", "a100")} <= supplied
    assert all(item["description"] for kind, name in supplied for item in listing[kind] if item["name"] == name)


TINY_LIBRARY = {
    f"layer_{i}": {
        "attn_g3+ffn_1536": {"stats": {"runtime_ms": 4.0, "memory_mib": 10.0}, "metrics": {"kl": 0.0}},
        "attn_g3+ffn_768": {"stats": {"runtime_ms": 3.0, "memory_mib": 7.0}, "metrics": {"kl": 0.01 * (i + 1)}},
        "attn_noop+ffn_noop": {"stats": {"runtime_ms": 0.0, "memory_mib": 0.0}, "metrics": {"kl": 0.2 + 0.1 * i}},
    }
    for i in range(4)
}


def test_its_solver_and_cost_model_are_usable_by_name_from_a_config(tmp_path):
    config_path = tmp_path / "example.yaml"
    config_path.write_text(
        "costs:\n  model: a100\n"
        "search:\n  solver:\n    name: brute_force\n    max_combinations: 1000\n"
    )
    config = load_config(config_path)
    registries = get_registries()
    assert isinstance(registries.record(config.costs.model).create(config.costs.model.options), CostModel)
    solver = registries.record(config.search.solver).create(config.search.solver.options)
    assert isinstance(solver, Solver)
    problem = build_problem(
        BlockLibrary.from_json(TINY_LIBRARY), "metrics.kl", constraints=["stats.runtime_ms<=11"]
    )
    (solution,) = run_solver(solver, problem, "brute_force")
    # 16 ms of parent blocks must lose 5 ms: a no-op (4 ms) where it hurts least, plus one 768-wide FFN (1 ms)
    chosen = [solution.chosen[f"layer_{i}"] for i in range(4)]
    assert chosen == ["attn_noop+ffn_noop", "attn_g3+ffn_768", "attn_g3+ffn_1536", "attn_g3+ffn_1536"]


def test_disabling_the_example_removes_its_items(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PUZZLE_DISABLE_PLUGINS", "example")
    with pytest.raises(UnknownNameError, match="Unknown solver 'brute_force'"):
        get_registries().solvers.get("brute_force")
    config_path = tmp_path / "example.yaml"
    config_path.write_text("search:\n  solver: brute_force\n")
    assert main(["config", "validate", str(config_path)]) == 2
    assert "config error at $.search.solver: Unknown solver 'brute_force'" in capsys.readouterr().err
