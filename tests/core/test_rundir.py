"""The run directory: atomic writes, the checksummed manifest, and the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from puzzle_core.errors import UserError
from puzzle_core.rundir import (
    LOCK,
    MANIFEST,
    TEMP_PREFIX,
    RunDir,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_json,
    remove_temp_files,
)


def temp_files(root) -> list:
    return sorted(p.name for p in root.rglob(TEMP_PREFIX + "*"))


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "deep" / "scores.json"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["scores.json"]


def test_atomic_path_on_exception_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "weights.safetensors"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert temp_files(tmp_path) == []


def test_atomic_write_json_refuses_nan_without_leaving_anything(tmp_path):
    target = tmp_path / "costs.json"
    atomic_write_json(target, {"runtime_ms": 1.5})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"runtime_ms": float("nan")})
    assert json.loads(target.read_text()) == {"runtime_ms": 1.5}
    assert temp_files(tmp_path) == []


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "child"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("killed")
    assert (target / "config.json").read_text() == "{}"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"], "old contents gone"
    assert temp_files(tmp_path) == []


def test_remove_temp_files_cleans_what_a_killed_writer_left(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / f"{TEMP_PREFIX}index.json.abc").write_text("partial")
    (tmp_path / f"{TEMP_PREFIX}child.xyz").mkdir()
    (tmp_path / f"{TEMP_PREFIX}child.xyz" / "model.safetensors").write_text("partial")
    (tmp_path / "library" / "index.json").write_text("{}")
    assert remove_temp_files(tmp_path) == 2
    assert temp_files(tmp_path) == []
    assert (tmp_path / "library" / "index.json").exists()


# ---------------------------------------------------------------- manifest


def test_stage_done_after_mark_done_and_not_after_a_change(tmp_path):
    run = RunDir(tmp_path)
    output = run.path("scores", "scores.json")
    atomic_write(output, "{}")
    assert not run.stage_done("score", "h1")
    run.mark_done("score", "h1", [output])
    assert run.stage_done("score", "h1")
    assert not run.stage_done("score", "h2"), "another config hash"
    output.write_text('{"tampered": 1}')
    assert not run.stage_done("score", "h1"), "checksum mismatch"
    output.unlink()
    assert not run.stage_done("score", "h1"), "output gone"


def test_mark_done_records_relative_paths_and_sha256(tmp_path):
    run = RunDir(tmp_path)
    atomic_write(run.path("a.txt"), "abc")
    run.mark_done("stage", "h", [run.path("a.txt")])
    manifest = json.loads(run.path(MANIFEST).read_text())
    assert manifest == {
        "stage": {
            "config_hash": "h",
            "outputs": {"a.txt": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        }
    }


def test_a_folder_output_covers_every_file_in_it(tmp_path):
    run = RunDir(tmp_path)
    with atomic_dir(run.path("child")) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"weights")
    run.mark_done("assemble", "h", [run.path("child")])
    assert set(run.manifest()["assemble"]["outputs"]) == {"child/config.json", "child/model.safetensors"}
    assert run.stage_done("assemble", "h")
    run.path("child", "model.safetensors").write_bytes(b"corrupted")
    assert not run.stage_done("assemble", "h")


def test_invalidate_forgets_one_stage(tmp_path):
    run = RunDir(tmp_path)
    atomic_write(run.path("x"), "1")
    run.mark_done("library", "h", [run.path("x")])
    run.mark_done("score", "h", [run.path("x")])
    run.invalidate("library")
    assert set(run.manifest()) == {"score"}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"score": 3}', b"\xff\xfe"])
def test_corrupt_manifest_is_a_user_error(tmp_path, content):
    run = RunDir(tmp_path)
    path = run.path(MANIFEST)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UserError, match="manifest.json is corrupt. Delete it"):
        run.stage_done("score", "h")


# ---------------------------------------------------------------- lock

HOLDER = """
import sys
from puzzle_core.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of ``tmp_path / 'run'`` until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_live_owner_is_refused_with_its_pid(tmp_path, holder):
    with pytest.raises(UserError) as caught:
        with RunDir(tmp_path / "run").lock():
            pass
    message = str(caught.value)
    assert f"is in use by process {holder.pid}" in message
    assert "Wait for it to finish, or use another --run-dir." in message


def test_the_lock_of_a_killed_owner_is_taken_over(tmp_path, holder):
    lock = tmp_path / "run" / LOCK
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock.read_text() == str(holder.pid), "SIGKILL left the lock file behind"
    with RunDir(tmp_path / "run").lock():
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = finished.stdout.strip()
    run = RunDir(tmp_path)
    run.path(LOCK).write_text(dead_pid)
    with run.lock():
        assert run.path(LOCK).read_text() == str(os.getpid())
    assert not run.path(LOCK).exists()


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        with RunDir(tmp_path).lock():
            assert run.path(LOCK).exists()
        assert run.path(LOCK).exists(), "the outer holder still has it"
    assert not run.path(LOCK).exists()


def test_lock_is_released_when_the_body_raises(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RuntimeError):
        with run.lock():
            raise RuntimeError("stage failed")
    with run.lock():
        pass
