"""Temporary installed distributions, for testing the real entry-point path without pip.

A distribution is a ``<name>-<version>.dist-info`` folder (METADATA + entry_points.txt)
next to its modules in a folder on ``sys.path``: exactly what ``importlib.metadata``
reads for a pip-installed package.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import uuid
from pathlib import Path

import pytest


class Site:
    """A folder on ``sys.path`` that tests install distributions into."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.modules: list[str] = []
        monkeypatch.syspath_prepend(str(root))

    def install(
        self, distribution: str, plugins: dict[str, str], group: str = "puzzle", version: str = "1.0"
    ) -> dict[str, str]:
        """Install ``distribution`` with one entry point per ``plugins`` item (name -> module source).

        Returns entry-point name -> module name; module names are unique per call, so a
        module imported by one test is never served from ``sys.modules`` to another.
        """
        module_names = {name: f"puzzle_test_{name}_{uuid.uuid4().hex[:8]}" for name in plugins}
        for name, source in plugins.items():
            (self.root / f"{module_names[name]}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        lines = [f"[{group}]"] + [f"{name} = {module}" for name, module in module_names.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        self.modules.extend(module_names.values())
        return module_names

    def uninstall(self, distribution: str) -> None:
        """Remove ``distribution``'s metadata (its modules stay, as after ``pip uninstall`` in a live process)."""
        for info in self.root.glob(f"{distribution.replace('-', '_')}-*.dist-info"):
            shutil.rmtree(info)

    def forget_modules(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


SOLVER_PLUGIN = """
    from puzzle_core.api import hookimpl
    from puzzle_core.interfaces import Solver
    from puzzle_core.records import SolverPlugin

    class Choose(Solver):
        def __init__(self, options):
            self.options = options

        def solve(self, problem):
            return []

    @hookimpl
    def puzzle_solvers():
        return [SolverPlugin(name="{name}", implementation=Choose, description="a test solver")]
"""


def solver_plugin(name: str) -> str:
    """Source of a plugin module registering one solver called ``name``."""
    return SOLVER_PLUGIN.replace("{name}", name)


@pytest.fixture
def site_packages(tmp_path, monkeypatch):
    """A fresh folder on ``sys.path`` for temporary distributions."""
    folder = Site(tmp_path / "site-packages", monkeypatch)
    yield folder
    folder.forget_modules()
