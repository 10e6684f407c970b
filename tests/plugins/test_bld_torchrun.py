"""The library built by torchrun workers (gloo, CPU) is bit-identical to the ``local`` executor's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from puzzle_core.config import structure
from puzzle_core.pipeline import run_pipeline
from puzzle_core.rundir import sha256_file
from puzzle_core.schema import PuzzleConfig
from tests.tiny import TINY_RUN

CONFIG = {
    **TINY_RUN,
    "library": {
        "tokens": 512,
        "heldout_tokens": 128,
        "calibration_tokens": 256,
        "batch_size": 4,
        "shard_tokens": 128,
        "lr": 3e-4,
        "variants": {"name": "llama", "ffn_fractions": [0.5, 0.25]},
    },
}


def with_executor(executor) -> dict:
    data = json.loads(json.dumps(CONFIG))
    data["library"]["executor"] = executor
    return data


def hashes(run_dir, folder: str) -> dict[str, str]:
    root = run_dir / folder
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def local_library(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    run_pipeline(structure(with_executor("local"), PuzzleConfig), run_dir, stages=["library"], echo=lambda _m: None)
    return run_dir


def test_torchrun_launched_by_the_executor_matches_local_bitwise(local_library, tmp_path):
    config = structure(with_executor({"name": "torchrun", "nproc": 2, "threads": 1}), PuzzleConfig)
    run_pipeline(config, tmp_path, stages=["library"], echo=lambda _m: None)
    assert hashes(tmp_path, "library/blocks") == hashes(local_library, "library/blocks")
    assert hashes(tmp_path, "activations") == hashes(local_library, "activations")
    assert (tmp_path / "workers" / "library.yaml").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "library/index.json" in manifest["library"]["outputs"]


def test_torchrun_started_by_the_user_matches_local_bitwise(local_library, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(with_executor({"name": "torchrun", "threads": 1})))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "puzzle_core.cli", "run", str(config), "--stage", "library", "--run-dir", str(run_dir)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashes(run_dir, "library/blocks") == hashes(local_library, "library/blocks")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "library" in manifest  # rank 0 recorded the stage
