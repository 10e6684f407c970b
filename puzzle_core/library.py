"""The block-library JSON: per layer, per variant, ``stats`` (costs) and ``metrics`` (scores).

The format is the one of the published Puzzle demo data, so libraries move between
tools::

    {"layer_0": {"attn_g3+ffn_1536": {"stats": {"runtime_ms": 8.1, ...},
                                      "metrics": {"kl": 0.0, ...}}, ...}, ...}

Unknown keys are kept. Objectives and constraints address values by dot-path
(``metrics.kl``, ``stats.memory_mib``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

from puzzle_core.errors import UserError
from puzzle_core.rundir import atomic_write_json

VariantRecord = dict[str, Any]


def layer_key(index: int) -> str:
    """``layer_<index>``: how libraries, scores and solutions name a layer."""
    return f"layer_{index}"


class BlockLibrary:
    """An ordered list of layers, each a mapping of variant name -> record."""

    def __init__(self, layers: list[dict[str, VariantRecord]] | None = None):
        self.layers: list[dict[str, VariantRecord]] = layers or []

    # ---- reading and writing

    @classmethod
    def from_json(cls, data: Any, source: str = "library") -> "BlockLibrary":
        """Parse and check the JSON structure; problems are :class:`UserError`."""
        if not isinstance(data, dict) or not data:
            raise UserError(f"{source}: a block library is a non-empty mapping of 'layer_<i>' to variants.")
        indices = {}
        for key in data:
            match = _LAYER_KEY.fullmatch(key) if isinstance(key, str) else None
            if match is None:
                raise UserError(f"{source}: unexpected top-level key {key!r}; expected 'layer_0', 'layer_1', ...")
            indices[int(match[1])] = key
        last = max(indices)
        if last + 1 != len(indices):
            missing = list(itertools.islice((layer_key(i) for i in range(last) if i not in indices), 10))
            raise UserError(
                f"{source}: layers {', '.join(missing)}{' ...' if len(missing) == 10 else ''} are missing; a library "
                f"needs every layer from layer_0 to layer_{last}."
            )
        layers = []
        for index in range(len(indices)):
            variants = data[indices[index]]
            if not isinstance(variants, dict):
                raise UserError(f"{source}: {layer_key(index)} must map variant names to records, not {variants!r:.60}.")
            if not variants:
                raise UserError(f"{source}: {layer_key(index)} must map variant names to records; it has none.")
            for name, record in variants.items():
                where = f"{source}: {layer_key(index)}.{name}"
                if not isinstance(record, dict):
                    raise UserError(f"{where} must be a mapping with 'stats'/'metrics'.")
                for section in ("stats", "metrics"):
                    if not isinstance(record.get(section, {}), dict):
                        raise UserError(f"{where}.{section} must be a mapping.")
                # unknown keys are kept, so they must survive being written back as strict JSON too
                for path, value in _numbers(record):
                    _check_number(value, f"{where}.{path}")
            layers.append(dict(variants))
        return cls(layers)

    @classmethod
    def read(cls, path: str | Path) -> "BlockLibrary":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Block library '{path}' does not exist. Run `puzzle run CONFIG --stage library` first.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"Block library '{path}' is not valid JSON ({exc}).") from None
        return cls.from_json(data, str(path))

    def to_json(self) -> dict[str, dict[str, VariantRecord]]:
        return {layer_key(i): variants for i, variants in enumerate(self.layers)}

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    # ---- access

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def variants(self, layer: int) -> list[str]:
        return list(self.layers[layer])

    def records(self) -> Iterator[tuple[int, str, VariantRecord]]:
        for index, variants in enumerate(self.layers):
            for name, record in variants.items():
                yield index, name, record

    def get(self, layer: int, variant: str, path: str) -> float:
        """The value at dot-path ``path`` of a variant; a missing one is a :class:`UserError`."""
        node: Any = self.layers[layer][variant]
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(
                    f"{layer_key(layer)}.{variant} has no value at '{path}'. Run the stage that fills it "
                    f"(scores: --stage score, costs: --stage cost) or pick a path the library has."
                )
            node = node[part]
        return _check_number(node, f"{layer_key(layer)}.{variant}.{path}")

    def set(self, layer: int, variant: str, path: str, value: float) -> None:
        node = self.layers[layer].setdefault(variant, {})
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    def has_path(self, path: str) -> bool:
        """Whether some variant holds anything at dot-path ``path``, a number or not."""
        for _, _, node in self.records():
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return True
        return False

    def paths(self) -> set[str]:
        """Every numeric dot-path present in some variant."""
        found: set[str] = set()
        for _, _, record in self.records():
            for section in ("stats", "metrics"):
                found.update(f"{section}.{key}" for key, value in record.get(section, {}).items() if _is_number(value))
        return found


_LAYER_KEY = re.compile(r"layer_(0|[1-9][0-9]*)", re.ASCII)


def _numbers(record: dict) -> Iterator[tuple[str, float]]:
    """Every number nested anywhere in ``record``, with its dot-path (no recursion limit)."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{key}" if path else str(key), child) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(node))
        elif _is_number(node):
            yield path, node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(value: Any, where: str) -> float:
    """``value`` if it is a finite number, else a :class:`UserError` naming ``where``."""
    if not _is_number(value):
        raise UserError(f"{where} is {value!r:.80}; expected a number.")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} is {value}; scores and costs must be finite numbers. Re-run the stage that wrote it.")
    return value
