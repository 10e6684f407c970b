"""Killing the library stage at any moment and resuming gives the library of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from puzzle_core.rundir import TEMP_PREFIX, sha256_file
from tests.tiny import TINY_RUN

CONFIG = {
    **TINY_RUN,
    "library": {
        "tokens": 1024,
        "heldout_tokens": 128,
        "calibration_tokens": 256,
        "batch_size": 4,
        "shard_tokens": 64,  # many small shards: the capture takes long enough to be interrupted
        "lr": 3e-4,
        "variants": {"name": "llama", "ffn_fractions": [0.5, 0.25]},
    },
}


def start(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "puzzle_core.cli", "run", str(config), "--stage", "library"]
    command += ["--run-dir", str(run_dir)]
    return subprocess.Popen([*command, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; it must still be running then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before it could be interrupted: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "never reached the point to interrupt"
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def files(run_dir: Path, folder: str, pattern: str) -> dict[str, str]:
    root = run_dir / folder
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob(pattern)) if p.is_file()}


def test_kill_and_resume_gives_bit_identical_blocks(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    finish(start(config, reference))

    # first kill: during activation capture (or just after, if the capture was quicker than the poll)
    kill_when(start(config, resumed), lambda: any((resumed / "activations").rglob("shards/*.json")))
    # second kill: in the middle of BLD, some blocks finished
    kill_when(start(config, resumed, "--resume"), lambda: len(list((resumed / "library").rglob("*.json"))) >= 4)
    done_before = len(list((resumed / "library" / "blocks").rglob("*.json")))
    finish(start(config, resumed, "--resume"))

    expected = files(reference, "library/blocks", "*.safetensors")
    assert len(expected) == 4 * 5 and done_before < len(expected)
    assert files(resumed, "library/blocks", "*.safetensors") == expected
    assert files(resumed, "activations", "*.safetensors") == files(reference, "activations", "*.safetensors")
    assert not [p for p in resumed.rglob(TEMP_PREFIX + "*")]
    index = json.loads((resumed / "library" / "index.json").read_text())
    reference_index = json.loads((reference / "library" / "index.json").read_text())
    assert [layer["blocks"] for layer in index["layers"]] == [layer["blocks"] for layer in reference_index["layers"]]
    for layer, reference_layer in zip(index["layers"], reference_index["layers"]):
        for name, record in layer["trained"].items():
            expected_record = reference_layer["trained"][name]
            for key in ("sha256", "seed", "steps", "tokens", "train_loss_final", "heldout_loss_after"):
                assert record[key] == expected_record[key], (name, key)
