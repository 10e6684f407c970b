"""The run directory: atomic artifact writes, a checksummed manifest, and a lock.

Every stage writes here through :func:`atomic_write` (temp file, fsync, rename) and
records what it wrote, with sha256 checksums and the hash of the config it used, in
``manifest.json``. A stage whose recorded outputs exist, match their checksums and were
made with the same config hash is skipped; that is what makes ``--resume`` lose nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import attrs

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
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on success it replaces ``target`` whole."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(target: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(target: str | Path, obj: Any) -> None:
    atomic_write(target, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_temp_files(root: str | Path) -> int:
    """Delete temp files left by a killed writer; returns how many."""
    import shutil

    count = 0
    for path in sorted(Path(root).rglob(TEMP_PREFIX + "*"), reverse=True):
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            count += 1
    return count


@attrs.define
class StageRecord:
    """What a finished stage wrote, by relative path -> sha256, and with which config."""

    config_hash: str
    outputs: dict[str, str] = attrs.Factory(dict)


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
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(
                f"{path} is corrupt. Delete it to recompute every stage of this run directory."
            ) from None

    def stage_done(self, stage: str, config_hash: str) -> bool:
        """Whether ``stage`` finished with this config and its outputs are intact."""
        record = self.manifest().get(stage)
        if not record or record.get("config_hash") != config_hash:
            return False
        for rel, digest in record.get("outputs", {}).items():
            path = self.path(rel)
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def mark_done(self, stage: str, config_hash: str, outputs: list[str | Path]) -> None:
        """Record ``stage`` as finished, with checksums of ``outputs``."""
        manifest = self.manifest()
        rels = sorted(str(Path(p).resolve().relative_to(self.root.resolve())) for p in outputs)
        manifest[stage] = {"config_hash": config_hash, "outputs": {r: sha256_file(self.path(r)) for r in rels}}
        atomic_write_json(self.path(MANIFEST), manifest)

    def invalidate(self, stage: str) -> None:
        manifest = self.manifest()
        if manifest.pop(stage, None) is not None:
            atomic_write_json(self.path(MANIFEST), manifest)

    # ---- lock

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory; a second live owner is refused, a dead one's lock taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.path(LOCK)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _read_pid(lock)
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise UserError(
                        f"Run directory {self.root} is in use by process {owner} (lock file {lock}). "
                        f"Wait for it to finish, or use another --run-dir."
                    ) from None
                # stale: its owner is gone; replace atomically so two takers cannot both win
                stale = lock.with_name(f"{LOCK}.stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(lock, stale)
                    stale.unlink()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            break
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                if _read_pid(lock) == os.getpid():
                    lock.unlink()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
