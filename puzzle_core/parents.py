"""Resolving the configured parent: an alias, a Hugging Face folder or a GGUF file -> (family, model).

Aliases come from the architecture plugins (:meth:`ModelFamily.aliases`); the family of
a path is detected from its ``config.json`` (or GGUF header) unless the config names one
(``parent.architecture``). Two families offering the same alias or claiming the same
model is an error naming both, unless the config names one. Families are guarded
(:mod:`puzzle_core.guarded`): a fault in their code names them.
Weights are read only from safetensors (or GGUF): a PyTorch pickle can run code when
loaded, so a parent that has nothing else is refused before any loader sees it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from puzzle_core.errors import UserError
from puzzle_core.guarded import GuardedFamily, create_family, describe, guarded
from puzzle_core.interfaces import LoadedModel, ModelFamily, ModelShape


def families(registries) -> dict[str, GuardedFamily]:
    """One instance of every registered architecture, by name (guarded)."""
    return {entry.name: create_family(entry) for entry in registries.architectures}


def parent_aliases(registries) -> dict[str, str]:
    """Every alias any architecture offers, with the architecture that offers it."""
    return {alias: name for name, family in families(registries).items() for alias in family.aliases()}


def _one(claims: list[GuardedFamily], what: str) -> GuardedFamily | None:
    """The only family in ``claims``; several are an error naming each, and how to pick one."""
    if len(claims) > 1:
        named = " and ".join(describe(family.entry) for family in claims)
        raise UserError(
            f"{what} is claimed by {named}. Set parent.architecture (--architecture on the command line) to the one "
            f"to use: {', '.join(family.entry.name for family in claims)}."
        )
    return claims[0] if claims else None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLES_REFUSED = (
    "puzzle reads weights only from safetensors or GGUF files, because unpickling can run arbitrary code. If you "
    "trust the file, convert it once yourself (torch.load(..., weights_only=True), then save_pretrained(..., "
    "safe_serialization=True)) and point the parent at the result."
)


def check_weight_files(folder: Path) -> None:
    """A model folder must hold safetensors weights: pickles are refused (never opened), none at all is an error."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{folder} holds its weights only as PyTorch pickle files ({', '.join(pickles[:3])}). {PICKLES_REFUSED}")
    raise UserError(f"{folder} has a config.json but no weights (no .safetensors file); copy or export the model again.")


def source_config(path: Path) -> dict[str, Any]:
    """What detection looks at: ``config.json`` of a folder, or the architecture of a GGUF file."""
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path} is a PyTorch pickle file. {PICKLES_REFUSED}")
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        try:
            field = GGUFReader(str(path)).fields["general.architecture"]
            return {"model_type": bytes(field.parts[field.data[0]]).decode()}
        except Exception as exc:
            raise UserError(f"{path} could not be read as a model GGUF file ({type(exc).__name__}: {exc}).") from None
    return read_config(path)


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder; a path without one is a UserError."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir() or not path.is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model folder (it has no config.json). Point the parent at a folder "
            f"written by save_pretrained, a .gguf file, or an alias such as smollm2-135m."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-export the model.") from None


def resolve_parent(section, registries) -> tuple[ModelFamily, Path]:
    """The family and the local path of ``section.source``."""
    choice = section.architecture
    if choice is not None:
        candidates = {choice.name: create_family(registries.architectures.entry(choice.name), choice.options)}
    else:
        candidates = families(registries)
    offering = _one([family for family in candidates.values() if section.source in family.aliases()],
                    f"The parent alias '{section.source}'")
    if offering is not None:
        make = offering.aliases()[section.source]
        return offering, Path(guarded(offering.entry, make, f"making the parent '{section.source}'"))
    path = Path(section.source).expanduser()
    if not path.exists():
        aliases = ", ".join(sorted(parent_aliases(registries))) or "(none installed)"
        raise UserError(
            f"Parent '{section.source}' is neither a known alias nor an existing path. Aliases: {aliases}; "
            f"otherwise give a local Hugging Face model folder or a .gguf file."
        )
    config = source_config(path)
    if choice is not None:
        return candidates[choice.name], path
    detected = _one([family for family in candidates.values() if family.detect(config)],
                    f"{path} (model_type {config.get('model_type')!r})")
    if detected is not None:
        return detected, path
    raise UserError(
        f"No installed architecture recognises {path} (model_type {config.get('model_type')!r}). Installed "
        f"architectures: {', '.join(candidates) or '(none)'}. Install a plugin for it, or set parent.architecture "
        f"if one of these fits."
    )


def parent_shape(section, registries) -> tuple[ModelFamily, ModelShape] | None:
    """The parent's family and shape from its ``config.json`` alone (no weights read); ``None`` for a GGUF file."""
    family, path = resolve_parent(section, registries)
    if path.is_dir():
        return family, family.shape(read_config(path))
    return None


def loads_layers_alone(family: ModelFamily) -> bool:
    """Whether ``family`` can load some layers of a parent without the others."""
    own = family.family if isinstance(family, GuardedFamily) else family
    return type(own).load_parent_layers is not ModelFamily.load_parent_layers


def load_parent_layers(section, registries, layers, ends: bool = False) -> tuple[ModelFamily, LoadedModel]:
    """The parent with real weights for ``layers`` only (:meth:`ModelFamily.load_parent_layers`)."""
    family, path = resolve_parent(section, registries)
    if path.is_dir():
        check_weight_files(path)
    with readable_weights(path):
        return family, family.load_parent_layers(str(path), list(layers), section.dtype, section.trust_remote_code,
                                                 ends=ends)


@contextlib.contextmanager
def readable_weights(path: Path):
    """A damaged safetensors file met while loading ``path`` is a UserError."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise UserError(
            f"The weights of parent {path} cannot be read ({exc}): a safetensors file there is truncated or "
            f"damaged. Copy or export the model again."
        ) from None


def load_parent(section, registries) -> tuple[ModelFamily, LoadedModel]:
    """Load the parent a :class:`~puzzle_core.schema.ParentSection` names, in its dtype."""
    family, path = resolve_parent(section, registries)
    if path.is_dir():
        check_weight_files(path)
    with readable_weights(path):
        return family, family.load_parent(str(path), dtype=section.dtype, trust_remote_code=section.trust_remote_code)
