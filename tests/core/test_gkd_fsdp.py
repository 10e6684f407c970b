"""GKD sharded with FSDP2 over two gloo processes: the single-process loss curve, sharded checkpoints, resume."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from puzzle_core import gkd
from puzzle_core.config import unstructure
from test_gkd import join_group, make_child, make_setup, section, train

# Two processes with 2 sequences each and one process with 4 see the same sequences per step; summation
# order differs, and Adam magnifies that noise where gradients are ~0 (the DDP test uses the same bounds).
RTOL, ATOL = 1e-3, 2e-4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, settings: dict, stop_after: int | None) -> None:
    """One torchrun-like process training the tiny child with gkd.sharding: fsdp."""
    join_group(rank, world_size, port)
    try:
        family, parent, corpus = make_setup()
        if stop_after is not None:  # SIGKILL rank 1 once that step's checkpoint is complete
            import os
            import signal

            original = gkd._Training.save

            def save_then_die(self, step, log):
                original(self, step, log)
                if step >= stop_after and rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

            gkd._Training.save = save_then_die
        model, log, _ = train(family, parent, corpus, Path(out_dir), section(**settings), child=make_child(family, parent))
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                      f"{out_dir}/fsdp.safetensors")
            Path(out_dir, "fsdp_log.json").write_text(json.dumps(unstructure(log)))
        else:
            assert model is None
    finally:
        torch.distributed.destroy_process_group()


def spawn(out_dir: Path, settings: dict, stop_after: int | None = None) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(out_dir), settings, stop_after), nprocs=2, join=True)


def assert_same_training(out_dir: Path, single, single_log) -> None:
    from safetensors.torch import load_file

    sharded = load_file(str(out_dir / "fsdp.safetensors"))
    state = single.state_dict()
    assert sharded.keys() <= state.keys() and len(sharded) > 10
    for name, tensor in sharded.items():
        torch.testing.assert_close(tensor, state[name], rtol=RTOL, atol=ATOL)
    log = json.loads((out_dir / "fsdp_log.json").read_text())
    assert [p["step"] for p in log["train"]] == [p.step for p in single_log.train]
    for ours, theirs in zip(log["train"], single_log.train):
        assert ours["loss"] == pytest.approx(theirs.loss, rel=1e-4)
    assert log["validation"][-1]["kl"] == pytest.approx(single_log.validation[-1].kl, rel=1e-4)


SETTINGS = {"tokens": 1024, "batch_size": 2, "sharding": "fsdp", "checkpoint_every": 4}


@pytest.mark.slow  # two Python processes, twice
def test_fsdp_over_two_processes_matches_one_process_and_resumes_after_a_kill(tmp_path):
    family, parent, corpus = make_setup()
    single, single_log, _ = train(family, parent, corpus, tmp_path / "single",
                                  section(tokens=1024, batch_size=4, checkpoint_every=4))

    spawn(tmp_path / "whole", SETTINGS)
    assert_same_training(tmp_path / "whole", single, single_log)

    # rank 1 is SIGKILLed right after the step-4 checkpoint; the rerun resumes it and ends where the single run does
    with pytest.raises(Exception):
        spawn(tmp_path / "killed", SETTINGS, stop_after=4)
    checkpoint = gkd.latest_checkpoint(tmp_path / "killed" / "ckpt")
    assert checkpoint is not None and checkpoint.name == "step_0000004"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["model.rank0.safetensors", "model.rank1.safetensors", "optimizer.rank0.safetensors",
                     "optimizer.rank1.safetensors", "state.json", "state.rank0.json", "state.rank1.json"]
    spawn(tmp_path / "killed", SETTINGS)
    assert_same_training(tmp_path / "killed", single, single_log)


def test_activation_checkpointing_trains_the_same_weights(tmp_path):
    family, parent, corpus = make_setup()
    runs = [train(family, parent, corpus, tmp_path / str(flag), section(tokens=256, activation_checkpointing=flag))
            for flag in (False, True)]
    (plain, plain_log, _), (recomputed, recomputed_log, _) = runs
    assert [p.loss for p in recomputed_log.train] == [p.loss for p in plain_log.train]
    for (name, tensor), other in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(tensor, other), name
