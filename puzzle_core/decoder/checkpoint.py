"""Reading exported weights back and checking them against the model a config describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from puzzle_core.errors import UserError


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (one file, or shards with an index); damage is a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{folder} has no model.safetensors (or sharded index); export the child again.")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            weights.update(load_file(str(folder / name)))
        except SafetensorError as exc:
            raise UserError(f"{folder / name} cannot be read ({exc}): it is truncated or damaged. Export the child again.") from None
    return weights


def tensor_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """What differs between two state dicts' names and shapes, one phrase each (empty when they fit)."""
    problems = [f"missing {k}" for k in expected if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in expected]
    problems += [
        f"{k} is {tuple(given[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    return problems


def differences(child: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], whose: str,
                shapes: bool = True) -> str:
    """How ``child``'s tensors differ from ``source``'s (``whose`` names them: ``"the parent's"``); empty if they fit."""
    lacks, extra = sorted(set(source) - set(child)), sorted(set(child) - set(source))
    phrases = [f"lacks {whose} {', '.join(lacks)}" if lacks else "",
               f"has {', '.join(extra)}, which {whose} has not" if extra else ""]
    if shapes:
        phrases += [f"has {k} of {tuple(child[k].shape)} where {whose} is {tuple(source[k].shape)}"
                    for k in sorted(set(child) & set(source)) if tuple(child[k].shape) != tuple(source[k].shape)]
    return "; ".join(p for p in phrases if p)


def summary(problems: list[str], limit: int = 5) -> str:
    """The first ``limit`` problems joined, and how many more there are."""
    return "; ".join(problems[:limit]) + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")
