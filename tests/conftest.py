"""Shared fixtures: a fresh plugin manager and registries for every test, and a cache of the session's own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

USER_CACHE = Path(os.environ.get("PUZZLE_CACHE") or Path.home() / ".cache" / "puzzle").expanduser()
READ_ONLY_MODELS = ("smollm2-135m-instruct",)  # converted once from its GGUF (~20 s); copied, never written


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """``$PUZZLE_CACHE`` for the whole session: the user's own cache is never written.

    A SmolLM2 parent the user already converted is linked in (every writer replaces files
    by rename, so the user's copy cannot change); otherwise the slow tests convert it here.
    """
    root = tmp_path_factory.mktemp("puzzle-cache")
    for name in READ_ONLY_MODELS:
        source = USER_CACHE / "models" / name
        if (source / "config.json").is_file():
            shutil.copytree(source, root / "models" / name, copy_function=_link_or_copy)
    return root


@pytest.fixture(autouse=True)
def isolated_cache(session_cache, monkeypatch):
    """Every test (and every process it starts) uses the session's cache."""
    monkeypatch.setenv("PUZZLE_CACHE", str(session_cache))


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Every test starts from a newly built plugin manager (entry points re-read)."""
    import torch

    from puzzle_core.plugins import reset_plugin_manager
    from puzzle_core.registry import reset_registries

    torch.set_num_threads(1)
    monkeypatch.delenv("PUZZLE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("PUZZLE_DISABLE_PLUGINS", raising=False)
    reset_plugin_manager()
    reset_registries()
    yield
    reset_plugin_manager()
    reset_registries()


@pytest.fixture
def registries():
    from puzzle_core.registry import get_registries

    return get_registries()
