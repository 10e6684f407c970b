"""scripts/gpu_check.py: its commands are valid for this checkout, and without CUDA it says so and exits 0."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_run_step_is_a_valid_config(gpu_check, tmp_path):
    from puzzle_core.schema import load_config

    plan = gpu_check.steps(tmp_path, gpus=8)
    runs = [command for _, command in plan if command[0] == "run"]
    assert len(runs) == 2
    for command in runs:
        overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
        config = load_config(command[1], overrides)  # unknown keys or bad values would raise
        assert config.gkd.device == "cuda" and config.scenario.device == "cuda" and config.parent.dtype == "bf16"
    torchrun = load_config(runs[1][1], [runs[1][i + 1] for i, a in enumerate(runs[1]) if a == "--set"]).gkd
    assert torchrun.executor.options.nproc == 8 and torchrun.sharding == "fsdp"
    assert all(command[0] in ("run", "model") for _, command in plan)


def test_without_cuda_nothing_is_checked(gpu_check, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 0
    assert "No CUDA device visible" in capsys.readouterr().out
