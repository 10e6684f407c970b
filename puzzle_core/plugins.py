"""The plugin manager: every plugin, ours included, comes from the ``puzzle`` entry points.

``PUZZLE_DISABLE_PLUGINS=a,b`` skips entry points by name; a plugin that fails to import
is a warning (an error with ``PUZZLE_STRICT_PLUGINS=1``) and the others keep working.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from types import ModuleType

import pluggy

from puzzle_core import hookspecs
from puzzle_core.errors import PluginError

PROJECT = "puzzle"
ENTRY_POINT_GROUP = "puzzle"

hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginWarning(UserWarning):
    """A plugin was skipped or misbehaved; the rest of the system keeps working."""


def strict_plugins() -> bool:
    """Whether plugin faults are fatal (``PUZZLE_STRICT_PLUGINS=1``)."""
    return os.environ.get("PUZZLE_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def disabled_plugins() -> set[str]:
    """Entry-point names listed in ``PUZZLE_DISABLE_PLUGINS``."""
    raw = os.environ.get("PUZZLE_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def report_plugin_fault(message: str) -> None:
    """Warn about a broken plugin, or raise when plugins are strict."""
    if strict_plugins():
        raise PluginError(message + " (PUZZLE_STRICT_PLUGINS=1 makes this fatal; unset it to skip the plugin)")
    warnings.warn(message + " The plugin was skipped; set PUZZLE_DISABLE_PLUGINS to silence this.", PluginWarning, stacklevel=3)


class PuzzlePluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution supplied each plugin."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}

    def register_plugin(self, plugin: object, name: str, distribution: str) -> None:
        """Register ``plugin`` under ``name``, remembering its ``distribution``."""
        self.register(plugin, name=name)
        self.distributions[name] = distribution
        self.hook.puzzle_addhooks.call_historic(kwargs={"pluginmanager": self})

    def distribution_of(self, plugin_name: str) -> str:
        """The distribution that supplied a registered plugin (``<local>`` if unknown)."""
        return self.distributions.get(plugin_name, "<local>")

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every entry point of ``group``."""
        blocked = disabled_plugins()
        for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name):
            if entry_point.name in blocked or self.has_plugin(entry_point.name):
                continue
            distribution = entry_point.dist.name if entry_point.dist else "<unknown>"
            try:
                plugin: ModuleType = entry_point.load()
            except Exception as exc:  # a third-party import can fail in any way
                report_plugin_fault(
                    f"Plugin entry point '{entry_point.name}' ({entry_point.value}) from distribution "
                    f"'{distribution}' failed to import: {type(exc).__name__}: {exc}."
                )
                continue
            self.register_plugin(plugin, entry_point.name, distribution)
        self.check_pending()


def make_plugin_manager(load_entry_points: bool = True) -> PuzzlePluginManager:
    """A fresh manager; with entry points loaded unless asked otherwise (tests)."""
    manager = PuzzlePluginManager()
    if load_entry_points:
        manager.load_entry_points()
    return manager


_manager: PuzzlePluginManager | None = None


def get_plugin_manager() -> PuzzlePluginManager:
    """The process-wide manager, created on first use."""
    global _manager
    if _manager is None:
        _manager = make_plugin_manager()
    return _manager


def reset_plugin_manager(manager: PuzzlePluginManager | None = None) -> None:
    """Replace the process-wide manager (``None``: rebuild on next use)."""
    global _manager
    _manager = manager
