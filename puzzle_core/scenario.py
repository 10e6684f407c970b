"""The inference scenario a child is made fast for (``scenario:`` in a run config)."""

from __future__ import annotations

import attrs

from puzzle_core.dtypes import ScenarioDtype


def at_least(minimum: int):
    """An attrs validator: ``value >= minimum``."""

    def check(_instance, attribute, value):
        if value < minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, got {value}")

    return check


def device_name(_instance, attribute, value):
    """An attrs validator: ``cpu``, ``cuda``, ``cuda:<index>`` or ``auto``."""
    if value not in ("cpu", "cuda", "auto") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError(f"{attribute.name} must be 'cpu', 'cuda', 'cuda:<index>' or 'auto', got {value!r}")


@attrs.frozen
class Scenario:
    """The inference workload the child is made fast for.

    ``decode_len`` counts generated tokens per sequence: the prefill pass emits the first,
    then ``decode_len - 1`` single-token steps follow. ``dtype`` is the weights' and GEMMs'
    precision, ``kv_dtype`` the KV cache's. ``device`` and ``threads`` are where cost
    models that measure (``measured``) run: 'auto' is CUDA when available, else CPU.
    """

    batch_size: int = attrs.field(default=1, validator=at_least(1))
    prefill_len: int = attrs.field(default=128, validator=at_least(1))
    decode_len: int = attrs.field(default=128, validator=at_least(1))
    dtype: ScenarioDtype = "bf16"
    kv_dtype: ScenarioDtype = "bf16"
    device: str = attrs.field(default="cpu", validator=device_name)
    threads: int = attrs.field(default=2, validator=at_least(1))
    tensor_parallel: int = attrs.field(default=1, validator=at_least(1))
    gpus: int | None = attrs.field(default=None, validator=attrs.validators.optional(at_least(1)))

    def __attrs_post_init__(self):
        if self.gpus is not None and self.gpus % self.tensor_parallel:
            raise ValueError(
                f"gpus ({self.gpus}) must be a multiple of tensor_parallel ({self.tensor_parallel}): each group of "
                f"tensor_parallel GPUs serves one copy of the model"
            )

    @property
    def num_gpus(self) -> int:
        """GPUs in all: ``gpus``, else one tensor-parallel group."""
        return self.gpus if self.gpus is not None else self.tensor_parallel
