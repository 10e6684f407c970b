"""Configuration: YAML -> frozen attrs records through one cattrs converter.

Unknown keys are errors. A plugin section is ``{name: ..., <options>}`` (or just the
name); its options are structured into that plugin's own options class. Every problem
is collected and reported at once with its path, e.g.
``config error at $.search.solver.gap: expected float, got 'abc'``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from puzzle_core.errors import ConfigError, UnknownNameError, UserError

T = TypeVar("T")


def _structure_float(value: Any, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected float, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected float, got {value!r}") from None


def _structure_int(value: Any, _type: type) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected int, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected int, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"expected int, got {value!r}")
    return int(number)


def _structure_str(value: Any, _type: type) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected string, got {value!r}")
    return str(value)


def _structure_bool(value: Any, _type: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def make_converter() -> cattrs.Converter:
    """The converter every config and artifact record goes through."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(Path, lambda v, _: Path(_structure_str(v, str)))
    converter.register_unstructure_hook(Path, str)
    converter.register_structure_hook_func(_is_plugin_choice, _structure_plugin_choice)
    converter.register_unstructure_hook_func(_is_plugin_choice, _unstructure_plugin_choice)
    return converter


# ---------------------------------------------------------------- plugin choices


@attrs.frozen
class PluginChoice:
    """A plugin picked by name in a config, with its options structured."""

    kind: ClassVar[str] = ""

    name: str
    options: Any = None

    def create(self, registries=None) -> Any:
        """Build the component this choice names."""
        from puzzle_core.registry import get_registries

        return (registries or get_registries()).kind(self.kind).get(self.name).create(self.options)


def choice_type(kind: str) -> type[PluginChoice]:
    """The :class:`PluginChoice` subclass for ``kind`` (``solvers`` -> ``SolverChoice``)."""
    return _CHOICE_TYPES[kind]


def _make_choice_types() -> dict[str, type[PluginChoice]]:
    from puzzle_core.records import KINDS

    types = {}
    for kind in KINDS:
        class_name = "".join(part.title() for part in kind.rstrip("s").split("_")) + "Choice"
        types[kind] = attrs.frozen(type(class_name, (PluginChoice,), {"kind": kind, "__annotations__": {}}))
    return types


_CHOICE_TYPES = _make_choice_types()
ArchitectureChoice = _CHOICE_TYPES["architectures"]
BlockVariantsChoice = _CHOICE_TYPES["block_variants"]
ScorerChoice = _CHOICE_TYPES["scorers"]
CostModelChoice = _CHOICE_TYPES["cost_models"]
SolverChoice = _CHOICE_TYPES["solvers"]
DistillationLossChoice = _CHOICE_TYPES["distillation_losses"]
EvaluatorChoice = _CHOICE_TYPES["evaluators"]
ExecutorChoice = _CHOICE_TYPES["executors"]


def _is_plugin_choice(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, PluginChoice)


def _structure_plugin_choice(value: Any, type_: type[PluginChoice]) -> PluginChoice:
    from puzzle_core.registry import get_registries

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"expected a plugin name or a mapping with 'name', got {value!r}")
    raw = dict(value)
    name = _structure_str(raw.pop("name"), str)
    record = get_registries().kind(type_.kind).get(name)  # UnknownNameError lists choices
    options = CONVERTER.structure(raw, record.options)
    return type_(name=name, options=options)


def _unstructure_plugin_choice(choice: PluginChoice) -> dict:
    data = CONVERTER.unstructure(choice.options) if choice.options is not None else {}
    return {"name": choice.name, **data}


CONVERTER = make_converter()


# ---------------------------------------------------------------- errors


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s) {sorted(exc.extra_fields)}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, UnknownNameError):
        return str(exc)
    message = str(exc)
    if isinstance(exc, (TypeError, AttributeError)) and "expected" not in message:
        return f"wrong type ({message})"
    return message


def _collect(exc: BaseException, path: str, out: list[str]) -> None:
    """Flatten a cattrs exception group into ``at $.a.b: message`` lines."""
    if isinstance(exc, ClassValidationError):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "name")), None)
            sub_path = f"{path}.{note.name}" if note is not None else path
            _collect(sub, sub_path, out)
    elif isinstance(exc, IterableValidationError):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "index")), None)
            sub_path = f"{path}[{note.index}]" if note is not None else path
            _collect(sub, sub_path, out)
    elif isinstance(exc, ExceptionGroup):
        for sub in exc.exceptions:
            _collect(sub, path, out)
    else:
        if isinstance(exc, ForbiddenExtraKeysError):
            for key in sorted(exc.extra_fields):
                out.append(f"at {path}.{key}: unknown key")
            return
        out.append(f"at {path}: {_describe(exc)}")


def structure(data: Any, type_: type[T], source: str | None = None, path: str = "$") -> T:
    """Structure ``data`` into ``type_``, raising one :class:`ConfigError` with every problem."""
    try:
        return CONVERTER.structure(data, type_)
    except (ClassValidationError, IterableValidationError) as exc:
        problems: list[str] = []
        _collect(exc, path, problems)
        raise ConfigError(problems, source) from None
    except (ValueError, TypeError, KeyError, UnknownNameError) as exc:
        raise ConfigError([f"at {path}: {_describe(exc)}"], source) from None


def unstructure(obj: Any) -> Any:
    return CONVERTER.unstructure(obj)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; missing files and syntax errors become :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file '{path}' does not exist. Check the path, or start from configs/tiny.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"Config file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"Config file '{path}' is not valid YAML{where}: {problem}. Fix the syntax and retry.") from None
    return {} if data is None else data


def stable_hash(data: Any) -> str:
    """A short content hash of JSON-able data (keys sorted), for skip-if-done checks."""
    payload = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


Dtype = Literal["float32", "bfloat16"]
