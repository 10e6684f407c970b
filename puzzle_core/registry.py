"""Registries: one per kind, filled from the hooks, with helpful unknown-name errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import attrs

from puzzle_core.errors import PluginError, UnknownNameError, suggest
from puzzle_core.plugins import PuzzlePluginManager, get_plugin_manager, report_plugin_fault
from puzzle_core.records import KINDS, RECORD_TYPES, PluginRecord

if TYPE_CHECKING:
    from puzzle_core.choices import PluginChoice

__all__ = ["Entry", "Registry", "Registries", "build_registries", "get_registries"]


@attrs.frozen
class Entry:
    """A registered record and where it came from."""

    record: PluginRecord
    plugin: str
    distribution: str
    version: str = ""

    @property
    def name(self) -> str:
        """The record's name."""
        return self.record.name


class Registry:
    """All records of one kind, by name."""

    def __init__(self, kind: str, record_type: type[PluginRecord]):
        self.kind = kind
        self.record_type = record_type
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        """Add ``entry``; a name taken by another plugin is an error naming both."""
        previous = self._entries.get(entry.name)
        if previous is not None:
            raise PluginError(
                f"Two plugins register the {self.kind} name '{entry.name}': plugin '{previous.plugin}' "
                f"from distribution '{previous.distribution}' and plugin '{entry.plugin}' from distribution "
                f"'{entry.distribution}'. Uninstall one, or block one with PUZZLE_DISABLE_PLUGINS."
            )
        self._entries[entry.name] = entry

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """The entries, by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry:
        """The entry called ``name``; unknown names list the choices and suggest one."""
        try:
            return self._entries[name]
        except KeyError:
            singular = self.record_type.label()
            choices = ", ".join(self.names()) or "(none installed)"
            raise UnknownNameError(
                f"Unknown {singular} '{name}'.{suggest(name, self.names())} Available {self.kind}: {choices}. "
                f"Install a plugin that provides it, or pick one of these."
            ) from None

    def get(self, name: str) -> PluginRecord:
        """The record called ``name`` (unknown names as in :meth:`entry`)."""
        return self.entry(name).record


class Registries:
    """One :class:`Registry` per kind, as attributes (``registries.solvers``)."""

    def __init__(self) -> None:
        self._by_kind = {t.kind: Registry(t.kind, t) for t in RECORD_TYPES}

    def __getattr__(self, kind: str) -> Registry:
        try:
            return self.__dict__["_by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None

    def kind(self, kind: str) -> Registry:
        """The registry of ``kind`` (``solvers``...), also reachable as ``registries.solvers``."""
        return self._by_kind[kind]

    def items(self) -> list[tuple[str, Registry]]:
        """``(kind, registry)`` for every kind, in hook order."""
        return [(k, self._by_kind[k]) for k in KINDS]

    def record(self, choice: PluginChoice) -> PluginRecord:
        """The record a config's plugin choice names; build it with ``.create(choice.options)``."""
        return self._by_kind[choice.kind].get(choice.name)


def build_registries(manager: PuzzlePluginManager | None = None) -> Registries:
    """Call every ``puzzle_<kind>`` hook implementation and file what it returns.

    A hook that raises or returns something other than records of its kind is reported
    as a plugin fault naming the plugin and distribution; the others are kept.
    """
    manager = manager or get_plugin_manager()
    registries = Registries()
    for record_type in RECORD_TYPES:
        hook = getattr(manager.hook, f"puzzle_{record_type.kind}")
        registry = registries.kind(record_type.kind)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            plugin = impl.plugin_name
            distribution = manager.distribution_of(plugin)
            version = manager.version_of(plugin)
            where = f"plugin '{plugin}' from distribution '{distribution}'"
            skipped = f"Its {record_type.kind.replace('_', ' ')} were skipped"
            try:
                records = impl.function()
            except Exception as exc:  # third-party code can fail in any way
                report_plugin_fault(
                    f"Hook puzzle_{record_type.kind} of {where} raised {type(exc).__name__}: {str(exc).rstrip('.')}.", skipped
                )
                continue
            records = [] if records is None else records
            malformed = (
                [records] if not isinstance(records, (list, tuple)) else [r for r in records if not isinstance(r, record_type)]
            )
            if malformed:
                report_plugin_fault(
                    f"Hook puzzle_{record_type.kind} of {where} returned {malformed[0]!r:.200}; expected a list of "
                    f"{record_type.__name__} records from puzzle_core.api.",
                    skipped,
                )
                continue
            for record in records:
                registry.add(Entry(record=record, plugin=plugin, distribution=distribution, version=version))
    return registries


_registries: Registries | None = None


def get_registries() -> Registries:
    """The process-wide registries, built from the process-wide plugin manager."""
    global _registries
    if _registries is None:
        _registries = build_registries()
    return _registries


def reset_registries(registries: Registries | None = None) -> None:
    global _registries
    _registries = registries

