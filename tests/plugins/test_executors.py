"""The ``local`` and ``torchrun`` executors: every job once, balanced shares, failures reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_distributions import site_packages  # noqa: F401  (fixture)

from puzzle_core.choices import ExecutorChoice
from puzzle_core.config import structure
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Job, ProcessRole
from puzzle_core.pipeline import process_role
from puzzle_plugins.torchrun_executor import balanced_shares


def make(registries, name, **options):
    choice = structure({"name": name, **options}, ExecutorChoice)
    return registries.record(choice).create(choice.options)


def test_local_runs_every_job_in_order_with_its_threads(registries):
    seen = []
    executor = make(registries, "local", threads=1)
    before = torch.get_num_threads()
    executor.run([Job(f"j{i}") for i in range(4)], lambda job: seen.append((job.id, torch.get_num_threads())))
    assert seen == [(f"j{i}", 1) for i in range(4)]
    assert torch.get_num_threads() == before


def test_local_stops_at_the_first_failure(registries):
    seen = []

    def work(job):
        seen.append(job.id)
        if job.id == "b":
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make(registries, "local").run([Job("a"), Job("b"), Job("c")], work)
    assert seen == ["a", "b"]


def test_balanced_shares_cover_every_job_once_and_balance_cost():
    jobs = [Job(f"j{i}", cost=c) for i, c in enumerate([7, 5, 4, 4, 3, 3, 2, 1, 1])]
    shares = balanced_shares(jobs, 3)
    assert sorted(j.id for share in shares for j in share) == sorted(j.id for j in jobs)
    loads = [sum(j.cost for j in share) for share in shares]
    assert max(loads) - min(loads) <= max(j.cost for j in jobs)
    assert sorted(loads) == [10, 10, 10]
    assert balanced_shares(list(reversed(jobs)), 3) == shares  # order-independent: every rank agrees
    assert balanced_shares(jobs[:2], 4)[2:] == [[], []]


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PUZZLE_STAGE_WORKER")


@pytest.mark.parametrize(
    "env, role",
    [
        ({}, ProcessRole()),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ProcessRole(True, 0, 2, 0)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ProcessRole(False, 3, 4, 1)),
        # rank 0 of workers the torchrun executor launched: the launching process drives
        ({"RANK": "0", "WORLD_SIZE": "2", "PUZZLE_STAGE_WORKER": "1"}, ProcessRole(False, 0, 2, 0)),
    ],
    ids=["plain", "torchrun-rank0", "torchrun-rank3", "launched-rank0"],
)
def test_the_process_role_comes_from_the_executors(env, role, registries, monkeypatch):
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert process_role(registries) == role


CLUSTER_EXECUTOR = """
    import os

    from puzzle_core.api import hookimpl
    from puzzle_core.interfaces import Executor, ProcessRole
    from puzzle_core.records import ExecutorPlugin

    class ArrayTasks(Executor):
        def __init__(self, options):
            pass

        def process_role(self):
            task = os.environ.get("TEST_ARRAY_TASK")
            return None if task is None else ProcessRole(is_driver=False, rank=int(task), world_size=8)

        def run(self, jobs, work, description="jobs", context=None):
            for job in jobs:
                work(job)

    @hookimpl
    def puzzle_executors():
        return [ExecutorPlugin(name="array", implementation=ArrayTasks)]
"""


def test_a_third_party_executor_tells_its_workers_they_are_not_the_driver(site_packages, monkeypatch):
    from puzzle_core.registry import get_registries

    site_packages.install("array-executor", {"array": CLUSTER_EXECUTOR})
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert process_role(get_registries()).is_driver
    monkeypatch.setenv("TEST_ARRAY_TASK", "5")
    assert process_role(get_registries()) == ProcessRole(is_driver=False, rank=5, world_size=8)


def test_only_executor_plugins_read_launcher_environment_variables():
    root = Path(__file__).resolve().parents[2]
    readers = []
    for path in [*root.glob("puzzle_core/**/*.py"), *root.glob("plugins/**/*.py")]:
        if path.name.endswith("_executor.py"):
            continue
        text = path.read_text()
        readers += [f"{path.relative_to(root)}: {name}" for name in LAUNCHER_ENV if f'"{name}"' in text]
    assert readers == []


def test_torchrun_outside_torchrun_without_nproc_is_a_clear_error(registries, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="nproc"):
        make(registries, "torchrun").run([Job("a")], lambda job: None)


def test_torchrun_nproc_needs_a_pipeline_stage(registries, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match="stage"):
        make(registries, "torchrun", nproc=2).run([Job("a")], lambda job: None)


WORKER = textwrap.dedent(
    """
    import json, os, sys, torch
    from pathlib import Path
    from puzzle_core.choices import ExecutorChoice
    from puzzle_core.config import structure
    from puzzle_core.interfaces import Job
    from puzzle_core.registry import get_registries

    out = Path(sys.argv[1])
    fail = sys.argv[2] if len(sys.argv) > 2 else None
    choice = structure({"name": "torchrun", "threads": 1}, ExecutorChoice)
    executor = get_registries().record(choice).create(choice.options)

    def work(job):
        if job.id == fail:
            raise RuntimeError("job " + job.id + " failed on purpose")
        record = {"rank": int(os.environ["RANK"]), "threads": torch.get_num_threads()}
        (out / (job.id + ".json")).write_text(json.dumps(record))

    executor.run([Job("j%d" % i, cost=float(10 - i)) for i in range(6)], work, "test jobs")
    """
)


def torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=180)


def test_torchrun_two_processes_share_the_jobs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = torchrun(tmp_path, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(records) == [f"j{i}" for i in range(6)]
    ranks = {}
    for job, record in records.items():
        ranks.setdefault(record["rank"], []).append(job)
        assert record["threads"] == 1
    expected = balanced_shares([Job(f"j{i}", cost=float(10 - i)) for i in range(6)], 2)
    assert {rank: sorted(jobs) for rank, jobs in ranks.items()} == {
        rank: sorted(j.id for j in share) for rank, share in enumerate(expected)
    }


def test_torchrun_failure_on_one_rank_fails_the_run_without_hanging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = torchrun(tmp_path, str(out), "j1")
    assert result.returncode != 0
    assert "failed on purpose" in result.stderr
