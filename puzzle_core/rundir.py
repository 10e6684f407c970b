"""The run directory: atomic artifact writes, a checksummed manifest, and a lock.

Every stage writes here through :func:`atomic_write` (temp file, fsync, rename) and
records what it wrote, with sha256 checksums and the hash of the config it used, in
``manifest.json``. A stage whose recorded outputs exist, match their checksums and were
made with the same config hash is skipped; that is what makes ``--resume`` lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from puzzle_core.errors import UserError

TEMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
LOCK = ".lock"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success it is fsynced and renamed over it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on success it replaces ``target`` whole.

    An existing ``target`` is renamed aside (a temp name, so a crash leaves nothing that
    looks finished) and deleted only after the new folder is in place. With
    ``keep_existing`` a ``target`` that exists when the new folder is ready wins (another
    process published the same thing first, say a cache entry) and the new one is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent))
    aside = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
        if keep_existing:
            try:
                os.replace(tmp, target)  # fails when another process's folder is already there
            except OSError:
                if not target.is_dir():
                    raise
        else:
            if target.exists():
                os.replace(target, aside)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)


def atomic_write(target: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(target: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically (NaN and infinity refused)."""
    atomic_write(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def link_file(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (a copy across file systems), replacing ``target``.

    Safe for artifacts because every writer replaces files by rename: a later write to
    either path makes a new file and leaves the other's content alone.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def link_missing(source: Path, target: Path) -> int:
    """Link file ``source``, or every file under folder ``source``, where ``target`` lacks it; returns how many."""
    count = 0
    files = sorted(source.rglob("*")) if source.is_dir() else [source] if source.is_file() else []
    for path in files:
        destination = target / path.relative_to(source) if source.is_dir() else target
        if path.is_file() and not path.name.startswith(TEMP_PREFIX) and not destination.exists():
            link_file(path, destination)
            count += 1
    return count


def remove_temp_files(root: str | Path) -> int:
    """Delete temp files and folders left by a killed writer; returns how many."""
    count = 0
    for path in sorted(Path(root).rglob(TEMP_PREFIX + "*"), reverse=True):
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            count += 1
    return count


class RunDir:
    """A run directory and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ---- manifest

    def manifest(self) -> dict[str, dict]:
        path = self.path(MANIFEST)
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if not (isinstance(manifest, dict) and all(isinstance(r, dict) for r in manifest.values())):
            raise UserError(f"{path} is corrupt. Delete it to recompute every stage of this run directory.")
        return manifest

    def stage_done(self, stage: str, config_hash: str) -> bool:
        """Whether ``stage`` finished with this config and its outputs are intact."""
        record = self.manifest().get(stage)
        if not record or record.get("config_hash") != config_hash:
            return False
        outputs = record.get("outputs")
        if not isinstance(outputs, dict):
            return False
        for rel, digest in outputs.items():
            path = self.path(rel)
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def mark_done(self, stage: str, config_hash: str, outputs: list[str | Path]) -> None:
        """Record ``stage`` as finished, with checksums of ``outputs`` (a folder: every file in it)."""
        manifest = self.manifest()
        root = self.root.resolve()
        files: set[str] = set()
        for output in outputs:
            output = Path(output).resolve()
            found = [p for p in output.rglob("*") if p.is_file()] if output.is_dir() else [output]
            files.update(str(p.relative_to(root)) for p in found if not p.name.startswith(TEMP_PREFIX))
        manifest[stage] = {"config_hash": config_hash, "outputs": {r: sha256_file(self.path(r)) for r in sorted(files)}}
        atomic_write_json(self.path(MANIFEST), manifest)

    def adopt(self, source: "RunDir", stage: str, config_hash: str) -> bool:
        """Take ``stage`` over from run directory ``source`` if it finished there with ``config_hash``.

        Its outputs are linked in (:func:`link_file`) and its manifest entry copied, so
        this run skips the stage as if it had run here. Returns whether it was adopted.
        """
        if not source.stage_done(stage, config_hash):
            return False
        record = source.manifest()[stage]
        for rel in record["outputs"]:
            link_file(source.path(rel), self.path(rel))
        manifest = self.manifest()
        manifest[stage] = record
        atomic_write_json(self.path(MANIFEST), manifest)
        return True

    def invalidate(self, stage: str) -> None:
        manifest = self.manifest()
        if manifest.pop(stage, None) is not None:
            atomic_write_json(self.path(MANIFEST), manifest)

    # ---- lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory against other processes; re-entrant within this one.

        The lock is an ``flock`` on ``.lock``, which also holds the owner's pid for the
        message. The kernel drops it when its owner dies, however it dies, so the lock
        file of a killed run is simply taken over, and two takers can never both win.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.root.resolve()
        if key in _held:
            _held[key] += 1
            try:
                yield
            finally:
                _held[key] -= 1
            return
        lock = self.path(LOCK)
        fd = _acquire(lock, self.root)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # while still holding it, so nobody locks the doomed file
            os.close(fd)


_held: dict[Path, int] = {}  # run directories this process holds, with nesting depth


def _acquire(lock: Path, root: Path) -> int:
    """Lock ``lock`` exclusively (without waiting) and write our pid into it; returns its fd."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {owner}" if owner.isdigit() else "another process"
            raise UserError(
                f"Run directory {root} is in use by {who} (lock file {lock}). Wait for it to finish, "
                f"or use another --run-dir."
            ) from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:  # the previous owner removed it after our open: retry
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        os.fsync(fd)
        return fd
