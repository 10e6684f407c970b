"""Shared fixtures: a fresh plugin manager and registries for every test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
