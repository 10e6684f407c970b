"""Options of the Llama block-variant provider (kept free of heavy imports: read at plugin registration)."""

from __future__ import annotations

import attrs

ATTENTION_METHODS = ("mean_kv", "first_kv", "similar_kv", "fitted_kv")
FFN_METHODS = ("activations", "contribution", "weight_norm")
LINEAR_METHODS = ("lstsq", "zeros")


def _fractions(_instance, attribute, value):
    if not all(0 < f < 1 for f in value):
        raise ValueError(f"{attribute.name} must be fractions strictly between 0 and 1, got {value}")


@attrs.frozen
class LlamaVariantOptions:
    """Which alternatives each layer gets (the parent's own sub-blocks always come first) and their init."""

    ffn_fractions: list[float] = attrs.field(factory=lambda: [0.75, 0.5, 0.25, 0.1], validator=_fractions)
    round_to: int = attrs.field(default=8, validator=attrs.validators.ge(1))  # FFN sizes: multiples of this
    include_gqa: bool = True
    include_linear: bool = True
    include_no_op: bool = True
    attention_init: str = attrs.field(default="mean_kv", validator=attrs.validators.in_(ATTENTION_METHODS))
    ffn_init: str = attrs.field(default="activations", validator=attrs.validators.in_(FFN_METHODS))
    linear_init: str = attrs.field(default="lstsq", validator=attrs.validators.in_(LINEAR_METHODS))
