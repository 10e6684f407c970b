"""The plugin manager: every plugin, ours included, comes from the ``puzzle`` entry points.

``PUZZLE_DISABLE_PLUGINS=a,b`` skips entry points (by entry-point or distribution name).
A plugin that fails to import, that pluggy rejects, or that implements a hook no
specification defines (a misspelling) is a warning naming the entry point and its
distribution, and the others keep working; ``PUZZLE_STRICT_PLUGINS=1`` makes every such
fault an error.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

import pluggy

from puzzle_core import hookspecs
from puzzle_core.errors import PluginError, suggest

PROJECT = "puzzle"
ENTRY_POINT_GROUP = "puzzle"
LOCAL_DISTRIBUTION = "<local>"

hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginWarning(UserWarning):
    """A plugin was skipped or misbehaved; the rest of the system keeps working."""


def strict_plugins() -> bool:
    """Whether plugin faults are fatal (``PUZZLE_STRICT_PLUGINS=1``)."""
    return os.environ.get("PUZZLE_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def disabled_plugins() -> set[str]:
    """Entry-point or distribution names listed in ``PUZZLE_DISABLE_PLUGINS``."""
    raw = os.environ.get("PUZZLE_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def report_plugin_fault(message: str, skipped: str = "The plugin was skipped") -> None:
    """Warn about a broken plugin, or raise :class:`PluginError` when plugins are strict.

    ``skipped`` says what was left out, so the user knows what still works.
    """
    message = " ".join(message.split())  # one paragraph, whatever the plugin's exception looked like
    if strict_plugins():
        raise PluginError(f"{message} PUZZLE_STRICT_PLUGINS=1 makes this fatal; fix or uninstall the plugin, or unset it.")
    warnings.warn(
        f"{message} {skipped}; the rest keeps working (PUZZLE_DISABLE_PLUGINS=<name> silences this).",
        PluginWarning,
        stacklevel=3,
    )


def _describe_plugin(name: str, distribution: str) -> str:
    return f"Plugin '{name}' from distribution '{distribution}'"


class PuzzlePluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution supplied each plugin."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        # historic: every plugin registered from now on gets this call when it registers
        self.hook.puzzle_addhooks.call_historic(kwargs={"pluginmanager": self})

    def register_plugin(
        self, plugin: object, name: str, distribution: str = LOCAL_DISTRIBUTION, version: str = ""
    ) -> None:
        """Register ``plugin`` under ``name``, remembering its ``distribution`` and its ``version``.

        A plugin pluggy rejects (bad hook signature, taken name) or whose
        ``puzzle_addhooks`` raises is left unregistered and raises :class:`PluginError`.
        """
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # pluggy validation, or a plugin's own puzzle_addhooks
            if self.get_plugin(name) is plugin:
                self.unregister(name=name)
            raise PluginError(
                f"{_describe_plugin(name, distribution)} could not be registered: {type(exc).__name__}: {exc}"
            ) from exc
        self.distributions[name] = distribution
        self.versions[name] = version

    def distribution_of(self, plugin_name: str) -> str:
        """The distribution that supplied a registered plugin (``<local>`` if unknown)."""
        return self.distributions.get(plugin_name, LOCAL_DISTRIBUTION)

    def version_of(self, plugin_name: str) -> str:
        """The version of the distribution that supplied a registered plugin (empty if unknown)."""
        return self.versions.get(plugin_name, "")

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every entry point of ``group``; faults are reported, not raised."""
        blocked = disabled_plugins()
        for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name):
            distribution = entry_point.dist.name if entry_point.dist else "<unknown>"
            version = entry_point.dist.version if entry_point.dist else ""
            where = f"Plugin entry point '{entry_point.name}' ({entry_point.value}) from distribution '{distribution}'"
            if blocked & {entry_point.name, distribution}:
                continue
            if self.has_plugin(entry_point.name):
                report_plugin_fault(
                    f"{where} has the same name as the one from distribution "
                    f"'{self.distribution_of(entry_point.name)}'.",
                    skipped="The second one was skipped",
                )
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:  # a third-party import can fail in any way
                report_plugin_fault(f"{where} failed to import: {type(exc).__name__}: {exc}.")
                continue
            try:
                self.register_plugin(plugin, entry_point.name, distribution, version)
            except PluginError as exc:
                cause = exc.__cause__
                report_plugin_fault(f"{where} could not be registered: {type(cause).__name__}: {cause}.")
        for plugin_name, hook_names in self.unknown_hooks().items():
            message = self._unknown_hooks_message(plugin_name, hook_names)
            self.unregister(name=plugin_name)
            report_plugin_fault(message)

    # ---- misspelt hooks

    def unknown_hooks(self) -> dict[str, list[str]]:
        """Plugin name -> the hooks it implements that no specification defines."""
        found: dict[str, list[str]] = {}
        for hook_name, caller in sorted(vars(self.hook).items()):
            if hook_name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    found.setdefault(impl.plugin_name, []).append(hook_name)
        return found

    def _unknown_hooks_message(self, plugin_name: str, hook_names: list[str]) -> str:
        known = sorted(name for name, caller in vars(self.hook).items() if not name.startswith("_") and caller.has_spec())
        details = "; ".join(f"'{name}'.{suggest(name, known)}" for name in hook_names)
        return (
            f"{_describe_plugin(plugin_name, self.distribution_of(plugin_name))} implements hooks that "
            f"puzzle does not define: {details} Rename them to one of: {', '.join(known)}."
        )

    def check_pending(self) -> None:
        """Raise :class:`PluginError` for hook implementations no specification defines.

        This catches misspellings such as ``puzzle_solver`` for ``puzzle_solvers``, which
        pluggy would otherwise ignore silently.
        """
        problems = [self._unknown_hooks_message(p, hooks) for p, hooks in self.unknown_hooks().items()]
        if problems:
            raise PluginError(" ".join(problems))


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
