"""Plugins picked by name in a config: ``solver: mip`` or ``solver: {name: mip, gap: 0.001}``.

A choice holds the plugin's name and its options, structured into the plugin's own
options class when the config is loaded (an unknown name lists the choices). The
component is built from the record it names: ``registries.record(choice).create(choice.options)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs

from puzzle_core.config import CONVERTER, structure_str
from puzzle_core.errors import UnknownNameError, suggest
from puzzle_core.records import (
    ArchitecturePlugin,
    CorpusPlugin,
    BlockVariantsPlugin,
    CostModelPlugin,
    DistillationLossPlugin,
    EvaluatorPlugin,
    ExecutorPlugin,
    ScorerPlugin,
    SolverPlugin,
)


@attrs.frozen
class PluginChoice:
    """A plugin picked by name in a config, with its options structured."""

    kind: ClassVar[str] = ""

    name: str
    options: object = None


@attrs.frozen
class ArchitectureChoice(PluginChoice):
    kind: ClassVar[str] = ArchitecturePlugin.kind


@attrs.frozen
class BlockVariantsChoice(PluginChoice):
    kind: ClassVar[str] = BlockVariantsPlugin.kind


@attrs.frozen
class ScorerChoice(PluginChoice):
    kind: ClassVar[str] = ScorerPlugin.kind


@attrs.frozen
class CostModelChoice(PluginChoice):
    kind: ClassVar[str] = CostModelPlugin.kind


@attrs.frozen
class SolverChoice(PluginChoice):
    kind: ClassVar[str] = SolverPlugin.kind


@attrs.frozen
class DistillationLossChoice(PluginChoice):
    kind: ClassVar[str] = DistillationLossPlugin.kind


@attrs.frozen
class EvaluatorChoice(PluginChoice):
    kind: ClassVar[str] = EvaluatorPlugin.kind


@attrs.frozen
class ExecutorChoice(PluginChoice):
    kind: ClassVar[str] = ExecutorPlugin.kind


@attrs.frozen
class CorpusChoice(PluginChoice):
    kind: ClassVar[str] = CorpusPlugin.kind


PATH_CORPUS = "files"
"""The corpus that reads a ``data.corpus`` given as a path rather than a corpus name."""

_CHOICE_TYPES: dict[str, type[PluginChoice]] = {t.kind: t for t in PluginChoice.__subclasses__()}


def choice_type(kind: str) -> type[PluginChoice]:
    """The :class:`PluginChoice` subclass for ``kind`` (``solvers`` -> ``SolverChoice``)."""
    return _CHOICE_TYPES[kind]


def _is_plugin_choice(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, PluginChoice)


def _structure_plugin_choice(value: Any, type_: type[PluginChoice]) -> PluginChoice:
    from puzzle_core.registry import get_registries

    if isinstance(value, str):
        corpora = get_registries().corpora
        if type_ is CorpusChoice and value not in corpora:
            close = suggest(value, corpora.names())
            if close and not Path(value).expanduser().exists():  # a misspelt name rather than a path
                raise UnknownNameError(
                    f"Unknown corpus '{value}'.{close} Corpora: {', '.join(corpora.names())}; or give an existing "
                    f"file or folder."
                )
            value = {"name": PATH_CORPUS, "path": value}  # not a corpus name: a file or folder
        else:
            value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"expected a plugin name or a mapping with 'name', got {value!r}")
    raw = dict(value)
    name = structure_str(raw.pop("name"), str)
    record = get_registries().kind(type_.kind).get(name)  # UnknownNameError lists choices
    options = CONVERTER.structure(raw, record.options)
    return type_(name=name, options=options)


def _unstructure_plugin_choice(choice: PluginChoice) -> dict:
    data = CONVERTER.unstructure(choice.options) if choice.options is not None else {}
    return {"name": choice.name, **data}


def corpus_choice(value: object, path: str = "$.data.corpus") -> CorpusChoice:
    """A corpus choice from a corpus name, a path (read by the ``files`` corpus) or a mapping (config key ``path``)."""
    from puzzle_core.config import structure

    return value if isinstance(value, CorpusChoice) else structure(value, CorpusChoice, path=path)


CONVERTER.register_structure_hook_func(_is_plugin_choice, _structure_plugin_choice)
CONVERTER.register_unstructure_hook_func(_is_plugin_choice, _unstructure_plugin_choice)
