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


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(session_cache):
    """Every test, fixture (module-scoped ones too) and process they start uses the session's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PUZZLE_CACHE", str(session_cache))
        yield


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_cache):
    """A run directory made by every stage of ``configs/tiny.yaml`` (smaller budgets, one baseline,
    GKD of the main child only, KL the only evaluator), with its ``config.yaml``, shared by the session: copy it
    before changing it."""
    import yaml

    from puzzle_core.config import structure
    from puzzle_core.pipeline import run_pipeline
    from puzzle_core.rundir import RunDir
    from puzzle_core.schema import PuzzleConfig

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
    config["library"].update(tokens=512, shard_tokens=512)
    config["scoring"]["tokens"] = 128
    config["search"]["baselines"] = ["greedy"]
    config["gkd"].update(tokens=256, children="main")
    config["evaluation"] = {"evaluators": [{"name": "kl_to_parent", "tokens": 128, "seq_len": 32}]}
    root = tmp_path_factory.mktemp("tiny-run") / "run"
    with pytest.MonkeyPatch.context() as patch:  # session scope: before the per-test fixtures
        patch.setenv("PUZZLE_CACHE", str(session_cache))
        run_pipeline(structure(config, PuzzleConfig), root, config_text=yaml.safe_dump(config), echo=lambda _: None)
    return RunDir(root)
