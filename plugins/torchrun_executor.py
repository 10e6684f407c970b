"""The ``torchrun`` executor: jobs shared among torch.distributed processes.

Two ways to use it:

- ``torchrun --nproc_per_node N -m puzzle_core.cli run CONFIG --stage library ...``:
  every process runs the same pipeline (rank 0 drives: it holds the run-directory lock
  and writes the manifest) and, at each executor call, takes its share of the jobs.
  Work outside executor calls is repeated by every process (same results, written
  atomically), so name the stages whose executor is ``torchrun`` with ``--stage``;
- ``nproc: N`` in the config: a plain ``puzzle run`` launches ``torchrun`` itself, with
  the run's resolved config, to re-run the current stage in N worker processes, waits,
  then checks every job in-process (finished jobs are skipped, so this is cheap).

Shares are balanced by each job's estimated ``cost`` (longest job first onto the least
loaded process), and the split depends only on the job list, so every process computes
the same one. Works with gloo on CPU and NCCL on GPUs (one GPU per local rank).
"""

from __future__ import annotations

import atexit
import ctypes
import heapq
import os
import signal
import subprocess
import sys
from datetime import timedelta
from typing import Callable, Literal, Sequence

import attrs
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from puzzle_core.api import Executor, ExecutorPlugin, Job, ProcessRole, StageContext, UserError, hookimpl

PR_SET_PDEATHSIG = 1  # prctl option: signal this process when its parent dies
WORKER_ENV = "PUZZLE_STAGE_WORKER"  # set for the workers this executor launches: none of them is the driver


@attrs.frozen
class TorchrunOptions:
    nproc: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # >0: launch torchrun with this many
    threads: int = attrs.field(default=1, validator=attrs.validators.ge(1))  # torch threads per process
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when CUDA is available, else gloo
    timeout_minutes: float = 720.0  # how long a process waits for the others at the end of a job list


def balanced_shares(jobs: Sequence[Job], workers: int) -> list[list[Job]]:
    """Split ``jobs`` over ``workers``: longest first, each onto the least loaded worker (LPT).

    Deterministic (ties broken by job id and worker index), so every process agrees.
    """
    shares: list[list[Job]] = [[] for _ in range(workers)]
    loads = [(0.0, index) for index in range(workers)]
    for job in sorted(jobs, key=lambda j: (-j.cost, j.id)):
        load, index = heapq.heappop(loads)
        shares[index].append(job)
        heapq.heappush(loads, (load + job.cost, index))
    return shares


class TorchrunExecutor(Executor):
    def __init__(self, options: TorchrunOptions):
        self.options = options
        self._launched: set[str] = set()  # stages whose workers already ran (they run the whole stage)

    def process_role(self) -> ProcessRole | None:
        """A rank of a torchrun job (its environment): rank 0 drives, unless this executor launched it."""
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return None
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        launched = os.environ.get(WORKER_ENV) == "1"
        return ProcessRole(rank == 0 and not launched, rank, world_size, int(os.environ.get("LOCAL_RANK", "0")))

    def run(
        self,
        jobs: Sequence[Job],
        work: Callable[[Job], None],
        description: str = "jobs",
        context: StageContext | None = None,
    ) -> None:
        role = self.process_role()
        if role is not None:
            self._run_share(role, jobs, work, description)
        elif self.options.nproc:
            if not jobs:
                return
            stage = context.stage if context is not None else None
            if stage not in self._launched:
                self._launch(context)
                self._launched.add(stage)
            for job in tqdm(jobs, desc=f"{description} (checking)", unit="job", dynamic_ncols=True):
                work(job)
        else:
            raise UserError(
                "The torchrun executor found no torch.distributed environment. Start the run under torchrun "
                "(torchrun --nproc_per_node N -m puzzle_core.cli run CONFIG ...), or give the executor "
                "'nproc: N' so that it launches torchrun itself."
            )

    def check_environment(self) -> list[str]:
        if self.options.backend != "nccl":
            return []
        if not torch.cuda.is_available():
            return ["backend 'nccl' runs on CUDA GPUs, but torch sees no CUDA device on this machine. Use backend: "
                    "gloo (or auto, which picks gloo here), or run on a machine with NVIDIA GPUs."]
        if not dist.is_nccl_available():
            return ["backend 'nccl' is not available in this build of torch (torch.distributed.is_nccl_available() "
                    "is false). Install a CUDA build of torch, or use backend: gloo."]
        if self.options.nproc > torch.cuda.device_count():
            return [f"nproc is {self.options.nproc} with backend 'nccl', which needs one GPU per process, but this "
                    f"machine has {torch.cuda.device_count()}. Lower nproc, or use backend: gloo."]
        return []

    # ------------------------------------------------------------------ inside torchrun

    def _backend(self) -> str:
        if self.options.backend != "auto":
            return self.options.backend
        return "nccl" if torch.cuda.is_available() else "gloo"

    def _join(self, rank: ProcessRole) -> None:
        torch.set_num_threads(self.options.threads)
        if dist.is_initialized():
            return
        backend = self._backend()
        if backend == "nccl":
            torch.cuda.set_device(rank.local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=self.options.timeout_minutes))
        atexit.register(_leave)

    def _run_share(self, rank: ProcessRole, jobs: Sequence[Job], work: Callable[[Job], None], description: str) -> None:
        """Run this rank's share, then agree with the others on whether everyone succeeded."""
        if rank.world_size == 1:
            share = list(jobs)
        else:
            self._join(rank)
            share = balanced_shares(jobs, rank.world_size)[rank.rank]
        failure: Exception | None = None
        label = f"{description} [rank {rank.rank}/{rank.world_size}]"
        for job in tqdm(share, desc=label, unit="job", dynamic_ncols=True, disable=rank.rank != 0):
            try:
                work(job)
            except Exception as exc:  # reported after the others are told, so nobody waits forever
                failure = exc
                break
        if rank.world_size == 1:
            if failure is not None:
                raise failure
            return
        device = torch.device("cuda", rank.local_rank) if self._backend() == "nccl" else torch.device("cpu")
        failed = torch.tensor([0 if failure is None else 1], device=device)
        dist.all_reduce(failed)
        if failure is not None:
            raise failure
        if failed.item():
            raise UserError(
                f"{int(failed.item())} of {rank.world_size} processes failed while running {description}; "
                f"their errors are printed above. Fix the cause and re-run with --resume: finished jobs are kept."
            )

    # ------------------------------------------------------------------ launching torchrun

    def _launch(self, context: StageContext | None) -> None:
        """Re-run the current stage in ``nproc`` torchrun workers and wait for them."""
        if context is None or context.stage is None:
            raise UserError(
                "The torchrun executor with 'nproc' relaunches the current pipeline stage, but was called outside "
                "a pipeline stage. Call it from a stage (it needs the run context), or run under torchrun yourself."
            )
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.options.nproc}",
            "-m", "puzzle_core.cli", *context.worker_arguments(),
        ]  # fmt: skip
        env = {**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": str(self.options.threads)}
        result = subprocess.run(command, env=env, preexec_fn=_die_with_parent)
        if result.returncode != 0:
            raise UserError(
                f"The {self.options.nproc} torchrun workers of stage '{context.stage}' failed (exit code "
                f"{result.returncode}); their errors are printed above. Fix the cause and re-run with --resume: "
                f"finished jobs are kept."
            )


def _die_with_parent() -> None:
    """In the launched torchrun: get SIGTERM when the launching process dies (Linux), so a
    killed run leaves no workers behind that would race with its resumption."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@hookimpl
def puzzle_executors() -> list[ExecutorPlugin]:
    return [
        ExecutorPlugin(
            name="torchrun",
            implementation=TorchrunExecutor,
            options=TorchrunOptions,
            description="shares jobs among torch.distributed processes (gloo on CPU, NCCL on GPU)",
        )
    ]
