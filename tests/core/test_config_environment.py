"""A config asking for CUDA or NCCL that this machine lacks fails at `puzzle config validate` (exit 2)."""

from __future__ import annotations

import pytest
import torch

from puzzle_core.cli import main

GPU_CONFIG = """\
parent: {source: tiny-random-llama}
costs: {model: h100}
library:
  device: cuda
  executor: {name: torchrun, nproc: 2, backend: nccl}
gkd:
  device: cuda:1
  executor: {name: torchrun, nproc: 2, backend: nccl}
"""


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as torch sees it without CUDA (it is so on CPU-only machines; forced on others)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def validate(tmp_path, text: str, capsys, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    args = [arg for override in overrides for arg in ("--set", override)]
    code = main(["config", "validate", str(path), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cuda_and_nccl_without_a_gpu(tmp_path, capsys, no_gpu):
    code, output = validate(tmp_path, GPU_CONFIG, capsys)
    assert code == 2
    assert "at $.library.device: 'cuda' asks for a CUDA GPU, but torch sees none" in output
    assert "at $.gkd.device: 'cuda:1' asks for a CUDA GPU" in output
    assert "at $.library.executor: executor 'torchrun' cannot run here: backend 'nccl' runs on CUDA GPUs" in output
    assert "at $.gkd.executor" in output and "$.scoring.executor" not in output  # scoring runs locally
    # the fix the messages name is accepted
    code, output = validate(tmp_path, GPU_CONFIG, capsys, "library.device=auto", "gkd.device=cpu",
                            "library.executor.backend=gloo", "gkd.executor.backend=auto")
    assert code == 0, output
    # the run refuses before writing anything
    run_dir = tmp_path / "run"
    assert main(["run", str(tmp_path / "run.yaml"), "--run-dir", str(run_dir)]) == 2 and not run_dir.exists()


def test_measured_costs_on_cuda_without_a_gpu(tmp_path, capsys, no_gpu):
    text = "costs: {model: measured}\nscenario: {device: cuda, dtype: fp32, kv_dtype: fp32}\n"
    code, output = validate(tmp_path, text, capsys)
    assert code == 2 and "scenario.device is 'cuda', but torch sees no CUDA device" in output
    # an analytic model of a GPU prices it anywhere (configs/h100.yaml validates on a CPU machine)
    assert validate(tmp_path, text, capsys, "costs.model=h100")[0] == 0


def test_more_nccl_processes_than_gpus(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    code, output = validate(tmp_path, GPU_CONFIG, capsys)
    assert code == 2
    assert "at $.library.device" not in output  # one GPU is there
    assert "'cuda:1' names a GPU this machine does not have (it has 1: cuda:0 to cuda:0)" in output
    assert "nproc is 2 with backend 'nccl', which needs one GPU per process, but this machine has 1" in output
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert "not available in this build of torch" in validate(tmp_path, GPU_CONFIG, capsys)[1]
