"""Configuration: YAML -> frozen attrs records through one cattrs converter.

Unknown keys are errors. A plugin section is ``{name: ..., <options>}`` (or just the
name); its options are structured into that plugin's own options class. Every problem
is collected and reported at once with its path, e.g.
``config error at $.search.solver.gap: expected float, got 'abc'``.
"""

from __future__ import annotations

import collections.abc
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import attrs
import cattrs
import cattrs.cols
import cattrs.gen
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from puzzle_core.dtypes import DTYPE_BYTES, canonical_dtype
from puzzle_core.errors import ConfigError, UnknownNameError, UserError, suggest

T = TypeVar("T")


def _structure_float(value: Any, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected float, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected float, got {value!r}") from None


Number = int | float  # a count read back stays an int (num_params: 36992), a measurement a float


def _structure_number(value: Any, _type: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _structure_int(value: Any, _type: type) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected int, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected int, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"expected int, got {value!r}")
    return int(number)


def structure_str(value: Any, _type: type) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected string, got {value!r}")
    return str(value)


def _structure_bool(value: Any, _type: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _structure_literal(value: Any, type_: Any) -> Any:
    choices = typing.get_args(type_)
    if isinstance(value, str) and set(choices) <= set(DTYPE_BYTES):
        value = canonical_dtype(value)  # one dtype vocabulary: 'bfloat16' is read as 'bf16'
    # compare types too: YAML's `true` must not pass for a Literal[1]
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _is_literal(type_: Any) -> bool:
    return typing.get_origin(type_) is Literal


def _is_list(type_: Any) -> bool:
    return typing.get_origin(type_) in (list, collections.abc.Sequence, collections.abc.MutableSequence)


def _is_dict(type_: Any) -> bool:
    return typing.get_origin(type_) in (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _type_name(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, (str, int, float)) else type(value).__name__


def _list_factory(type_: Any, converter: cattrs.Converter):
    """Lists refuse strings and mappings, which cattrs would otherwise iterate character by character."""
    structure_items = cattrs.cols.list_structure_factory(type_, converter)

    def structure_list(value: Any, _type: Any) -> list:
        if isinstance(value, (str, bytes, collections.abc.Mapping)) or not isinstance(value, collections.abc.Iterable):
            raise ValueError(f"expected a list, got {_type_name(value)}")
        return structure_items(value, _type)

    return structure_list


def _dict_factory(type_: Any, converter: cattrs.Converter):
    structure_items = cattrs.cols.mapping_structure_factory(type_, converter)

    def structure_dict(value: Any, _type: Any) -> dict:
        if not isinstance(value, collections.abc.Mapping):
            raise ValueError(f"expected a mapping, got {_type_name(value)}")
        return structure_items(value, _type)

    return structure_dict


def _attrs_factory(type_: Any, converter: cattrs.Converter):
    """Sections must be mappings; an empty one (``section:`` with nothing under it) means defaults."""
    structure_fields = cattrs.gen.make_dict_structure_fn(type_, converter)

    def structure_section(value: Any, _type: Any) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, collections.abc.Mapping):
            raise ValueError(f"expected a mapping, got {_type_name(value)}")
        return structure_fields(value, _type)

    return structure_section


OMITTED_WHILE_UNSET = {"omit_if_default": True}
"""Field metadata for an option added after runs exist: records (a run's ``config.yaml``, the
stage hashes) leave it out while it has its default, so finished run directories stay valid."""


def _attrs_unstructure_factory(type_: Any, converter: cattrs.Converter):
    overrides = {field.name: cattrs.gen.override(omit_if_default=True)
                 for field in attrs.fields(type_) if field.metadata.get("omit_if_default")}
    return cattrs.gen.make_dict_unstructure_fn(type_, converter, **overrides)


def make_converter() -> cattrs.Converter:
    """The converter every config and artifact record goes through."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook_factory(attrs.has, _attrs_factory)
    converter.register_structure_hook_factory(_is_list, _list_factory)
    converter.register_structure_hook_factory(_is_dict, _dict_factory)
    converter.register_structure_hook_func(_is_literal, _structure_literal)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(Number, _structure_number)
    converter.register_structure_hook(str, structure_str)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(Path, lambda v, _: Path(structure_str(v, str)))
    converter.register_unstructure_hook_factory(attrs.has, _attrs_unstructure_factory)
    converter.register_unstructure_hook(Path, str)
    return converter


CONVERTER = make_converter()


# ---------------------------------------------------------------- errors


def _unknown_key_problems(exc: ForbiddenExtraKeysError, path: str) -> list[str]:
    known = [field.name for field in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
    problems = []
    for key in sorted(exc.extra_fields, key=str):
        hint = suggest(key, known) or f" Known keys: {', '.join(known) or '(none)'}."
        problems.append(f"at {path}.{key}: unknown key.{hint}")
    return problems


def _describe(exc: BaseException) -> str:
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
            if note is None:
                sub_path = path
            elif isinstance(note.index, int):
                sub_path = f"{path}[{note.index}]"
            else:  # a mapping's key
                sub_path = f"{path}.{note.index}"
            _collect(sub, sub_path, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        out.extend(_unknown_key_problems(exc, path))
    elif isinstance(exc, ConfigError):  # raised by a nested structure(), e.g. a default's factory
        out.extend(f"at {path}{problem.removeprefix('at $')}" for problem in exc.problems)
    elif isinstance(exc, ExceptionGroup):
        for sub in exc.exceptions:
            _collect(sub, path, out)
    else:
        out.append(f"at {path}: {_describe(exc)}")


def structure(data: Any, type_: type[T], source: str | None = None, path: str = "$") -> T:
    """Structure ``data`` into ``type_``, raising one :class:`ConfigError` with every problem."""
    try:
        return CONVERTER.structure(data, type_)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
        problems: list[str] = []
        _collect(exc, path, problems)
        raise ConfigError(problems, source) from None
    except (ValueError, TypeError, KeyError, UnknownNameError) as exc:
        raise ConfigError([f"at {path}: {_describe(exc)}"], source) from None


def unstructure(obj: Any) -> Any:
    return CONVERTER.unstructure(obj)


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<` may be overridden on purpose
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text safely; syntax errors and duplicate keys become :class:`UserError`."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"Config file '{source}' is not valid YAML{where}: {problem}. Fix the syntax and retry.") from None
    except RecursionError:
        raise UserError(f"Config file '{source}' is nested too deeply to be a config.") from None
    return {} if data is None else data


def read_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file; a missing, unreadable or malformed file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"Config file '{path}' {what}. Check the path, or start from configs/tiny.yaml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"Config file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as UTF-8 and retry."
        ) from None
    except OSError as exc:
        raise UserError(f"Config file '{path}' cannot be read: {exc.strerror}.") from None
    return parse_yaml(text, str(path))


def deep_merge(base: Any, overlay: Any) -> Any:
    """``overlay`` on ``base``: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, collections.abc.Mapping) and isinstance(overlay, collections.abc.Mapping):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return overlay


def apply_overrides(data: dict, overrides: Sequence[str], source: str = "--set") -> dict:
    """``data`` (a resolved config) with ``PATH=VALUE`` overrides merged in (:func:`deep_merge`).

    ``PATH`` is a dot-path to a key the config has (``search.speedup``, ``gkd.tokens``);
    ``VALUE`` is read as YAML (``2``, ``true``, ``null``, ``bf16``, ``[1.5, 2]``). Every
    malformed override and unknown path is reported at once, with suggestions.
    """
    problems = []
    for text in overrides:
        key, sep, raw = str(text).partition("=")
        path = [part.strip() for part in key.split(".")]
        if not sep or not all(path):
            problems.append(f"at --set {text!r}: expected PATH=VALUE, e.g. --set search.speedup=2")
            continue
        node, found = data, True
        for depth, part in enumerate(path):
            where = "$." + ".".join(path[: depth + 1])
            if not isinstance(node, collections.abc.Mapping):
                parent = "$." + ".".join(path[:depth])
                problems.append(f"at {where}: {parent} is {_type_name(node)}, not a section; set {parent[2:]}=... instead")
                found = False
                break
            if part not in node:
                known = sorted(map(str, node))
                hint = suggest(part, known) or f" Known keys: {', '.join(known) or '(none)'}."
                problems.append(f"at {where}: unknown key.{hint}")
                found = False
                break
            node = node[part]
        if not found:
            continue
        try:
            value: Any = yaml.load(raw, Loader=_StrictLoader)
        except yaml.YAMLError:
            problems.append(f"at --set {text!r}: the value is not valid YAML; quote strings that hold ':' or '#'")
            continue
        for part in reversed(path):
            value = {part: value}
        data = deep_merge(data, value)
    if problems:
        raise ConfigError(problems, source)
    return data


def stable_hash(data: Any) -> str:
    """A short content hash of JSON-able data (keys sorted), for skip-if-done checks."""
    payload = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

