"""The gkd stage with FSDP2 under the torchrun executor (2 gloo processes) writes a child that loads and runs."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle_core.config import structure
from puzzle_core.pipeline import run_pipeline
from puzzle_core.schema import PuzzleConfig
from tests.tiny import TINY_RUN

CONFIG = {
    **TINY_RUN,
    "library": {"tokens": 256, "heldout_tokens": 64, "calibration_tokens": 128, "batch_size": 4, "shard_tokens": 256,
                "variants": {"name": "llama", "ffn_fractions": [0.5]}},
    "scoring": {"tokens": 128, "batch_size": 4},
    "scenario": {"batch_size": 1, "prefill_len": 32, "decode_len": 8, "dtype": "fp32", "kv_dtype": "fp32"},
    "costs": {"model": "h100"},
    "search": {"solver": "mip", "objective": "metrics.kl", "speedup": 1.3},
    "gkd": {"tokens": 512, "batch_size": 2, "checkpoint_every": 2, "sharding": "fsdp",
            "executor": {"name": "torchrun", "nproc": 2, "threads": 1}},
}


@pytest.mark.slow  # a tiny pipeline, then two torchrun processes
def test_gkd_stage_with_fsdp_under_torchrun(tmp_path):
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries

    config = structure(CONFIG, PuzzleConfig)
    root = tmp_path / "run"
    stages = ["library", "score", "cost", "search", "assemble", "gkd"]
    run_pipeline(config, root, stages=stages, echo=lambda _: None)
    index = json.loads((root / "gkd" / "index.json").read_text())
    (result,) = index["children"]
    assert result["steps"] == 512 // (2 * 32 * 2) and result["kl_after"] >= 0
    assert not (root / "gkd" / result["child"] / "checkpoints").exists()  # cleaned up once exported
    family, child = load_parent(structure({"source": str(root / "gkd" / result["child"] / "final")},
                                          type(config.parent)), get_registries())
    with torch.no_grad():
        assert torch.isfinite(child.model(torch.tensor([[5, 6, 7, 8]])).logits).all()
