"""Numerical guards through the CLI: a NaN loss stops BLD and GKD with a clear message, and nothing good is lost.

A third-party distribution installed for this file registers two distillation losses
(``nan_mse`` on hidden states for BLD, ``nan_kl`` on logits for GKD) that turn NaN after
``after`` calls while ``$NAN_LOSS_ARMED`` is set; the switch is outside the config, so
the rerun without it has the same stage hashes and may reuse what the failed run kept.

- BLD: the library stage exits 2 naming the diverged job and its step; the blocks trained
  before it stay on disk and are reused, not retrained, by the ``--resume`` that follows;
  the diverged job leaves no weights.
- GKD: the gkd stage exits 2 naming the child, the step and the last good checkpoint,
  which stays on disk; the ``--resume`` continues from it (its progress starts at that
  step) and finishes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_distributions import Site

from puzzle_core.cli import main
from puzzle_core.rundir import TEMP_PREFIX

NAN_LOSSES = """
    import os

    import attrs
    import torch

    from puzzle_core.api import hookimpl
    from puzzle_core.interfaces import DistillationLoss
    from puzzle_core.records import DistillationLossPlugin as Record


    @attrs.frozen
    class NanOptions:
        after: int = 0  # calls that stay finite


    class NanAfter(DistillationLoss):
        def __init__(self, options):
            self.after, self.calls = options.after, 0

        def __call__(self, student, teacher, labels=None):
            self.calls += 1
            value = self.finite(student.float(), teacher.float())
            return value * float("nan") if os.environ.get("NAN_LOSS_ARMED") and self.calls > self.after else value


    class NanMSE(NanAfter):
        target = "hidden"

        def finite(self, student, teacher):
            return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


    class NanKL(NanAfter):
        target = "logits"

        def finite(self, student, teacher):
            teacher = torch.log_softmax(teacher.detach(), -1)
            return (teacher.exp() * (teacher - torch.log_softmax(student, -1))).sum(-1).mean()


    @hookimpl
    def puzzle_distillation_losses():
        return [Record(name="nan_mse", implementation=NanMSE, options=NanOptions, description="NaN after some calls"),
                Record(name="nan_kl", implementation=NanKL, options=NanOptions, description="NaN after some calls")]
"""

# 4 layers x 7 units; each BLD job calls its loss 4 times (held-out before, 2 steps, held-out after):
# after 22 calls the 6th job diverges at its 2nd step. GKD trains 4 steps, one loss call each.
CONFIG = """parent:
  source: tiny-random-llama
threads: 1
data:
  corpus: synthetic
  seq_len: 32
library:
  tokens: 256
  heldout_tokens: 64
  calibration_tokens: 64
  batch_size: 4
  shard_tokens: 256
  loss: {name: nan_mse, after: 43}
scoring:
  tokens: 64
costs:
  model: h100
search:
  speedup: 1.5
gkd:
  children: main
  tokens: 512
  batch_size: 4
  checkpoint_every: 2
  validation_tokens: 64
  losses: [cosine, {name: nan_kl, after: 2}]
"""


def cli(capsys, monkeypatch, *argv, armed: bool) -> tuple[int, str]:
    if armed:
        monkeypatch.setenv("NAN_LOSS_ARMED", "1")
    else:
        monkeypatch.delenv("NAN_LOSS_ARMED", raising=False)
    from puzzle_core.plugins import reset_plugin_manager
    from puzzle_core.registry import reset_registries

    reset_plugin_manager()  # a fresh loss instance (and call count) per run, as in a new process
    reset_registries()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def run(tmp_path, monkeypatch):
    """``(config, run_dir)`` with the NaN losses installed as a third-party distribution."""
    Site(tmp_path / "site-packages", monkeypatch).install("nan-losses", {"nan_losses": NAN_LOSSES})
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    return config, tmp_path / "run"


def blocks(run_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_ino for p in (run_dir / "library" / "blocks").rglob("*") if p.is_file()}


def test_a_nan_loss_stops_bld_keeps_finished_blocks_and_gkd_keeps_its_last_checkpoint(run, capsys, monkeypatch):
    config, run_dir = run

    # BLD diverges in its second job (layer 1's pass: 7 held-out calls, then 7 units a step; call 44 is
    # the second unit's loss at step 2)
    code, err = cli(capsys, monkeypatch, "run", config, "--run-dir", run_dir, "--stage", "library", armed=True)
    assert code == 2 and "Traceback" not in err
    message = err[err.index("Error: "):].strip()
    assert re.fullmatch(r"Error: BLD job layer_\d+/\S+ diverged: its loss is nan at step 2 of 2 \(lr [^)]+\)\. "
                        r"Lower library\.lr, or check the parent's activations in \S+\.", message), message
    kept = blocks(run_dir)
    assert len(kept) == 2 * 7, "the first pass wrote the weights and records of its seven units"
    layer, unit = message.split()[3].split("/")  # layer_<i>/<unit>
    assert not (run_dir / "library" / "blocks" / f"layer_{int(layer[6:]):03d}" / f"{unit}.safetensors").exists()
    assert not list(run_dir.rglob(TEMP_PREFIX + "*")) and "library" not in _manifest(run_dir)

    # the rerun trains only what is missing, then goes on to GKD, which diverges at step 3
    code, err = cli(capsys, monkeypatch, "run", config, "--run-dir", run_dir, "--resume", "--stage", "library",
                    armed=False)
    assert code == 0, err
    assert {p: ino for p, ino in blocks(run_dir).items() if p in kept} == kept, "finished blocks were not retrained"
    assert len(blocks(run_dir)) == 2 * 28
    stages = ["score", "cost", "search", "assemble"]
    code, err = cli(capsys, monkeypatch, "run", config, "--run-dir", run_dir, "--resume",
                    *[a for s in stages for a in ("--stage", s)], armed=False)
    assert code == 0, err
    code, err = cli(capsys, monkeypatch, "run", config, "--run-dir", run_dir, "--resume", "--stage", "gkd", armed=True)
    assert code == 2 and "Traceback" not in err
    checkpoint = run_dir / "gkd" / "mip" / "checkpoints" / "step_0000002"
    message = err[err.index("Error: "):].strip()
    assert message.startswith("Error: GKD mip diverged at step 3: loss nan"), message
    assert f"The last good checkpoint is {checkpoint};" in message and "rerun with --resume" in message
    assert (checkpoint / "state.json").is_file() and not (run_dir / "gkd" / "mip" / "final").exists()

    # the rerun resumes from that checkpoint and finishes
    code, err = cli(capsys, monkeypatch, "run", config, "--run-dir", run_dir, "--resume", "--stage", "gkd", armed=False)
    assert code == 0, err
    progress = re.findall(r"GKD mip:\s+\d+%\|[^|]*\| (\d)/4", err)
    assert progress and progress[0] == "2", f"GKD restarted at step {progress[:1]}, not at the checkpoint's step 2"
    result = json.loads((run_dir / "gkd" / "mip" / "result.json").read_text())
    assert result["steps"] == 4 and not checkpoint.exists()


def _manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}
