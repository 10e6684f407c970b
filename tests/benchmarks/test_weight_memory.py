"""benchmarks/weight_memory.py times the parent where from_pretrained leaves it and from two copies."""

from __future__ import annotations

import json
import sys

from benchmarks import weight_memory


def test_weight_memory_times_the_checkpoint_and_two_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "weight_memory.json"
    config = weight_memory.ROOT / "configs" / "tiny.yaml"
    monkeypatch.setattr(sys, "argv", ["weight_memory.py", "--config", str(config), "--rounds", "2", "--warmup", "0",
                                      "--out", str(out)])
    weight_memory.main()
    rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    loaded, shifted, aligned = rows["as loaded"], rows["own memory, file offsets"], rows["own memory, aligned"]
    assert not loaded["owns_weights"] and not shifted["owns_weights"] and aligned["owns_weights"]
    assert shifted["offsets_mod_64"] == loaded["offsets_mod_64"] != [0]  # the file's misalignment, kept
    assert aligned["offsets_mod_64"] == [0]
    assert len(loaded["ms"]) == 2 and loaded["vs_aligned"]["count"] == 2
