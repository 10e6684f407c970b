"""One dtype vocabulary for configs, interfaces and cost models: ``fp32``, ``bf16``, ``fp16``, ``fp8``.

Configs may also spell the torch names (``float32``, ``bfloat16``, ``float16``); they are
read as the short ones, so a config written either way means the same run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from puzzle_core.errors import UserError

if TYPE_CHECKING:
    import torch

Dtype = Literal["fp32", "bf16", "fp16", "fp8"]
ModelDtype = Literal["fp32", "bf16"]
"""What weights are loaded and trained in."""
ScenarioDtype = Literal["fp32", "bf16", "fp8"]
"""What an inference scenario's weights, GEMMs and KV cache use."""

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
DTYPE_ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical_dtype(name: str) -> str:
    """``bfloat16`` -> ``bf16``; a name already in the vocabulary is returned as it is."""
    return DTYPE_ALIASES.get(name, name)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a vocabulary name (or of its torch spelling); a torch dtype passes through."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    canonical = canonical_dtype(str(name))
    if canonical not in _TORCH_NAMES:
        known = ", ".join(_TORCH_NAMES)
        raise UserError(f"Dtype '{name}' has no torch equivalent for model weights here; use one of {known}.")
    return getattr(torch, _TORCH_NAMES[canonical])
