"""Crash safety: SIGKILL a real ``puzzle run`` at seeded random points in every stage, resume, compare.

One uninterrupted run of a smaller overlay of ``configs/tiny.yaml`` gives the reference
artifacts and a trace of its write events (each ``fsync`` and rename, see
:mod:`crashpoints`) per stage, with their times. A second run directory is then driven
through the kill points, each a fresh ``puzzle run --resume`` process that is SIGKILLed:
during start-up after a seeded random delay (by this test), or inside its target stage
(:data:`KILLS_PER_STAGE`) at a seeded random write event, right before it or a random
fraction of the time to the next one later (mid-computation, mid-``save_file``), or when
the stage's work returned but before it is recorded. A last ``--resume`` finishes the
run. ``PUZZLE_CRASH_SEED`` draws other kill points (default: :data:`SEED`).

What must hold:

- **Identical artifacts.** Every file of the reference run exists in the resumed one and
  no other (apart from ``manifest.json``, ``config.yaml``, ``.lock``); safetensors
  (activations, library blocks, children, GKD'd children), tokenizers, configs, exported
  Python, and every other non-JSON file are byte-identical, except ``report/report.md`` and
  the PNG plots, which show measured throughput; JSON files (block records, the library
  index and view, scores, costs, solutions, children/GKD indexes and logs, evaluations,
  ``report/summary.json``) are equal after dropping the keys :data:`MEASURED` matches
  (wall-clock times, throughput, peak memory: noisy by nature). After every resume, the
  outputs of the stages finished so far already equal the reference's.
- **Nothing finished is done again.** A stage recorded in the manifest before a launch is
  only ever reported "(done, skipped)" by later launches, and its output files keep their
  inode (every write replaces a file by rename, so a rewrite would show). Finished jobs
  inside a stage (block records, score shards, per-model evaluations, GKD results) keep
  their inode too.
- **No temp files** (``.tmp-*``) are left once the run finished, the lock file is gone,
  and every artifact (all files but ``config.yaml`` and the activation cache) is recorded
  in the manifest with a checksum that matches it.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from puzzle_core.library_view import VIEW_RECORD
from puzzle_core.pipeline import STAGE_NAMES
from puzzle_core.rundir import LOCK, MANIFEST, TEMP_PREFIX, sha256_file

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("PUZZLE_CRASH_SEED", "9"))
STARTUP_KILLS = 2
KILLS_PER_STAGE = {"library": 8, "score": 2, "cost": 2, "search": 2, "assemble": 2, "gkd": 2, "evaluate": 2,
                   "report": 2}
# measured numbers: times (``wall_s``, ``train_seconds``...), rates (``train_tokens_per_s``,
# ``tokens_per_second``, ``throughput_tok_s``), ``peak_memory_mib``, ``latency_s``, ``measured_speedup``
MEASURED = re.compile(r"(_s|_seconds?|^seconds|_per_s)$|^(peak_|throughput|latency|measured_)")
NOT_COMPARED = frozenset({MANIFEST, "config.yaml", LOCK, "report/report.md"})
# files that finish one job inside a stage: once written, a resume must reuse them
JOB_RECORDS = ("library/blocks/*/*.json", "scores/shards/*.json", "eval/models/*.json", "gkd/*/result.json")

OVERLAY = {
    "library": {"tokens": 256, "heldout_tokens": 128, "calibration_tokens": 128, "shard_tokens": 256},
    "scoring": {"tokens": 128},
    "scenario": {"prefill_len": 16, "decode_len": 4},
    "search": {"baselines": ["greedy"]},
    "gkd": {"tokens": 512, "checkpoint_every": 2, "validation_tokens": 128},
    "evaluation": {"evaluators": [{"name": "kl_to_parent", "tokens": 128, "seq_len": 32},
                                  {"name": "throughput", "warmup": 0, "repeats": 1}]},
}


def small_config(folder: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    for section, values in OVERLAY.items():
        config.setdefault(section, {}).update(values)
    path = folder / "crash.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def environment(folder: Path) -> dict:
    """For ``puzzle`` processes: unbuffered stage lines, one thread, a cache of their own."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PUZZLE_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- one process


class Launch:
    """One ``puzzle run --resume`` process (through :mod:`crashpoints`, which ``plan`` drives).

    ``kill_after``: SIGKILL it from here that many seconds after launch.
    """

    def __init__(self, config: Path, run_dir: Path, env: dict, plan: dict | None = None,
                 kill_after: float | None = None):
        self.lines: list[tuple[float, str]] = []
        command = [sys.executable, "-m", "crashpoints", "run", str(config), "--run-dir", str(run_dir), "--resume"]
        env = {**env, "PUZZLE_CRASH": json.dumps(plan or {})}
        with open(run_dir.parent / "stderr.log", "a") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                            cwd=ROOT)
        self.launched = time.monotonic()
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self.killed_here = False
        if kill_after is not None:
            try:
                self.process.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.killed_here = True
        self.returncode = self.process.wait()
        reader.join()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @staticmethod
    def ran(line: str) -> str | None:
        """The stage a line announces as starting (not skipped), else None."""
        if not line.startswith("[") or "] " not in line or line.endswith("(done, skipped)"):
            return None
        name = line.split("] ", 1)[1].split(":", 1)[0]
        return name if name in STAGE_NAMES else None

    def stages_run(self) -> list[str]:
        return [s for _, line in self.lines if (s := self.ran(line))]

    def spans(self) -> dict[str, tuple[float, float]]:
        """``(start, end)`` monotonic times of each stage that ran: its line, and its "finished" line."""
        spans, current = {}, None
        for at, line in self.lines:
            if current and line.startswith("    finished in"):
                spans[current] = (spans[current][0], at)
                current = None
            elif stage := self.ran(line):
                current, spans[stage] = stage, (at, at)
        return spans


# ---------------------------------------------------------------- run directory state


def manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(TEMP_PREFIX + "*"))


def identities(run_dir: Path, paths) -> dict[str, tuple[int, int]]:
    found = {}
    for rel in paths:
        path = run_dir / rel
        if path.is_file():
            stat = path.stat()
            found[rel] = (stat.st_ino, stat.st_mtime_ns)
    return found


def job_records(run_dir: Path) -> list[str]:
    return [str(p.relative_to(run_dir)) for pattern in JOB_RECORDS for p in run_dir.glob(pattern)]


def without_measured(value):
    if isinstance(value, dict):
        return {k: without_measured(v) for k, v in value.items() if not MEASURED.search(k)}
    if isinstance(value, list):
        return [without_measured(v) for v in value]
    return value


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def differences(reference: Path, resumed: Path, paths=None) -> list[str]:
    """What differs between two run directories (see the module docstring), in ``paths`` or in all files."""
    problems = []
    ours = (files(reference) if paths is None else set(paths)) - NOT_COMPARED
    theirs = (files(resumed) if paths is None else {p for p in ours if (resumed / p).is_file()}) - NOT_COMPARED
    problems += [f"only in the uninterrupted run: {p}" for p in sorted(ours - theirs)]
    problems += [f"only in the resumed run: {p}" for p in sorted(theirs - ours)]
    for rel in sorted(ours & theirs):
        a, b = reference / rel, resumed / rel
        if rel.endswith(".json"):
            same = without_measured(json.loads(a.read_text())) == without_measured(json.loads(b.read_text()))
        elif rel.endswith(".png"):
            continue  # plots of measured throughput
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            problems.append(f"differs: {rel}")
    return problems


def check_manifest(run_dir: Path) -> None:
    """Every artifact is recorded with a checksum that matches: all files but the config copy and activations.

    Activations are a cache that checks itself (and may be deleted, ``library.keep_activations``).
    """
    records = manifest(run_dir)
    assert sorted(records) == sorted([*STAGE_NAMES, VIEW_RECORD])
    recorded = set()
    for stage, record in records.items():
        for rel, digest in record["outputs"].items():
            assert sha256_file(run_dir / rel) == digest, f"{stage}: {rel} does not match its checksum"
            recorded.add(rel)
    unrecorded = {rel for rel in files(run_dir) - recorded - {MANIFEST, "config.yaml"}
                  if not rel.startswith("activations/")}
    assert not unrecorded, unrecorded


# ---------------------------------------------------------------- the harness


def kill_points(rng: random.Random, trace: list[dict], spans: dict[str, tuple[float, float]]) -> list[dict]:
    """Seeded failpoint plans, stage by stage (see the module docstring)."""
    plans = []
    for stage, count in KILLS_PER_STAGE.items():
        times = [e["at"] for e in trace if e["stage"] == stage] + [spans[stage][1]]
        for _ in range(count):
            event = rng.randint(1, len(times))  # len(times): no such event, killed when the stage returns
            gap = times[event] - times[event - 1] if event < len(times) else 0.0
            delay = 0.0 if rng.random() < 0.25 else rng.uniform(0.0, gap)
            plans.append({"stage": stage, "event": event, "delay": delay})
    return plans


@pytest.mark.slow  # a few minutes: 26 processes, each loading torch (make test runs it, make test-fast does not)
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_artifacts(tmp_path, capsys):
    env = {**environment(tmp_path), "PYTHONPATH":
           os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    config = small_config(tmp_path)
    reference_dir, resumed_dir = tmp_path / "reference" / "run", tmp_path / "resumed" / "run"
    reference_dir.parent.mkdir()
    resumed_dir.parent.mkdir()

    trace_file = tmp_path / "trace.jsonl"
    started = time.monotonic()
    reference = Launch(config, reference_dir, env, {"trace": str(trace_file)})
    assert reference.returncode == 0, (reference_dir.parent / "stderr.log").read_text()[-3000:]
    spans = reference.spans()
    assert sorted(spans) == sorted(STAGE_NAMES)
    trace = [json.loads(line) for line in trace_file.read_text().splitlines()]
    startup = reference.lines[0][0] - reference.launched

    rng = random.Random(SEED)
    landed: Counter = Counter()  # kills per stage they landed in (None: start-up, before any stage)
    kills: list[tuple[str | None, dict, int]] = []  # (where it landed, plan, temp files it left)
    identical: list[bool] = []  # per resume: the finished stages' outputs so far equal the reference's
    frozen: dict[str, tuple[int, int]] = {}  # outputs of finished stages and jobs: must never change again

    def launch(plan: dict | None = None, kill_after: float | None = None) -> None:
        before = manifest(resumed_dir)
        run = Launch(config, resumed_dir, env, plan, kill_after)
        again = sorted(set(run.stages_run()) & set(before))
        assert not again, f"finished stage(s) {again} ran again"
        after = manifest(resumed_dir)
        stages = {name: record for name, record in after.items() if name in STAGE_NAMES}  # not the library view
        if kills:
            finished = [rel for record in stages.values() for rel in record["outputs"]]
            identical.append(not differences(reference_dir, resumed_dir, finished))
        pending = [s for s in STAGE_NAMES if s not in after]
        if not run.killed:
            assert run.returncode == 0, (resumed_dir.parent / "stderr.log").read_text()[-3000:]
            assert plan is None and not pending, f"{plan}: the process was not killed"
            return
        where = pending[0] if run.stages_run() else None
        assert plan is None or where == plan["stage"], f"{plan}: landed in {where}"
        landed[where] += 1
        kills.append((where, plan or {"after_s": kill_after}, len(temp_files(resumed_dir))))
        for record in stages.values():
            frozen.update(identities(resumed_dir, record["outputs"]))
        frozen.update(identities(resumed_dir, job_records(resumed_dir)))

    for _ in range(STARTUP_KILLS):
        launch(kill_after=rng.uniform(0.0, startup))
    for plan in kill_points(rng, trace, spans):
        launch(plan)
    launch()  # the last resume, to the end

    leftovers = temp_files(resumed_dir)
    changed = sorted(rel for rel, identity in frozen.items() if identities(resumed_dir, [rel]).get(rel) != identity)
    problems = differences(reference_dir, resumed_dir)
    report = [
        f"crash/resume harness (seed {SEED}): {len(kills)} SIGKILL points, {landed[None]} during start-up, "
        "per stage: " + ", ".join(f"{s} {landed[s]}" for s in STAGE_NAMES),
        f"  resumes whose finished artifacts equal the uninterrupted run's: {sum(identical)} of {len(identical)}; "
        f"final run directory identical: {not problems} ({len(files(reference_dir) - NOT_COMPARED)} files compared)",
        f"  temp files found right after the kills: {sum(k[2] for k in kills)} (cleared by the next resume); "
        f"left at the end: {len(leftovers)}; finished files written again: {len(changed)}",
        f"  {time.monotonic() - started:.0f}s in all, of which {spans['report'][1] - reference.launched:.0f}s "
        f"the uninterrupted run",
    ]
    with capsys.disabled():
        print("\n" + "\n".join(report))

    assert len(kills) == STARTUP_KILLS + sum(KILLS_PER_STAGE.values()) >= 20
    assert all(landed[s] >= KILLS_PER_STAGE[s] for s in STAGE_NAMES), landed
    assert all(identical), [k for k, same in zip(kills, identical) if not same]
    assert not problems, problems
    assert not changed, f"finished outputs were written again: {changed[:10]}"
    assert not leftovers, leftovers
    assert not (resumed_dir / LOCK).exists()
    check_manifest(resumed_dir)


# ---------------------------------------------------------------- two runs on one run directory


def test_a_second_run_on_a_busy_run_directory_is_refused_and_a_dead_owners_lock_taken_over(tmp_path):
    env = environment(tmp_path)
    config, run_dir = small_config(tmp_path), tmp_path / "run"
    command = [sys.executable, "-m", "puzzle_core.cli", "run", str(config), "--run-dir", str(run_dir), "--resume"]
    owner = subprocess.Popen([*command, "--stage", "library"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env, cwd=ROOT)
    try:
        assert owner.stdout.readline().startswith("[1/1] library"), "the owner holds the lock once a stage started"
        os.kill(owner.pid, signal.SIGSTOP)  # keep it holding the lock for as long as this test needs
        second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"Error: Run directory {run_dir} is in use by process {owner.pid} (lock file {run_dir / LOCK}). "
            f"Wait for it to finish, or use another --run-dir."
        )
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert (run_dir / LOCK).read_text() == str(owner.pid), "the dead owner's lock file is still there"
    taker = subprocess.run([*command, "--stage", "library"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert taker.returncode == 0, taker.stderr[-2000:]
    assert "library" in manifest(run_dir) and not (run_dir / LOCK).exists() and not temp_files(run_dir)
