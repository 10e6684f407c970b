"""The standard variant space of a decoder layer, and the names of the ways variants are initialised.

Kept free of torch: a family plugin's registration reads the options class.
"""

from __future__ import annotations

import attrs

from puzzle_core.blocks import AttentionSpec, FFNSpec, VariantSpace
from puzzle_core.errors import UserError
from puzzle_core.interfaces import ModelShape, VariantProvider

ATTENTION_METHODS = ("mean_kv", "first_kv", "similar_kv", "fitted_kv")
FFN_METHODS = ("activations", "contribution", "fitted", "weight_norm")
LINEAR_METHODS = ("lstsq", "zeros")


@attrs.frozen
class InitMethods:
    """How each kind of variant is initialised from the parent (see :mod:`puzzle_core.decoder.init`).

    As text: ``attention=fitted_kv,ffn=fitted,linear=lstsq`` (``default`` for all defaults: these three, the
    best measured on SmolLM2; see ``benchmarks/README.md``).
    """

    attention: str = attrs.field(default="fitted_kv", validator=attrs.validators.in_(ATTENTION_METHODS))
    ffn: str = attrs.field(default="fitted", validator=attrs.validators.in_(FFN_METHODS))
    linear: str = attrs.field(default="lstsq", validator=attrs.validators.in_(LINEAR_METHODS))
    ridge: float = 1e-4  # relative to the mean diagonal of X^T X

    def __str__(self) -> str:
        return f"attention={self.attention},ffn={self.ffn},linear={self.linear}"

    @classmethod
    def parse(cls, text: str) -> InitMethods:
        """The methods a text names; anything else is a :class:`UserError` listing the choices."""
        if text in ("", "default"):
            return cls()
        fields = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("attention", "ffn", "linear"):
                raise UserError(
                    f"Init method '{text}' is not understood; write e.g. 'attention=fitted_kv,ffn=fitted,"
                    f"linear=lstsq' (attention: {', '.join(ATTENTION_METHODS)}; ffn: {', '.join(FFN_METHODS)}; "
                    f"linear: {', '.join(LINEAR_METHODS)})."
                )
            fields[key.strip()] = value.strip()
        try:
            return cls(**fields)
        except ValueError as exc:
            raise UserError(f"Init method '{text}': {exc}.") from None


def _fractions(_instance, attribute, value):
    if not all(0 < f < 1 for f in value):
        raise ValueError(f"{attribute.name} must be fractions strictly between 0 and 1, got {value}")


@attrs.frozen
class DecoderVariantOptions:
    """Which alternatives each layer gets (the parent's own sub-blocks always come first) and their init."""

    ffn_fractions: list[float] = attrs.field(factory=lambda: [0.75, 0.5, 0.25, 0.1], validator=_fractions)
    round_to: int = attrs.field(default=8, validator=attrs.validators.ge(1))  # FFN sizes: multiples of this
    include_gqa: bool = True
    include_linear: bool = True
    include_no_op: bool = True
    # fitted_kv and fitted: 2-3x and ~5-10% lower held-out BLD loss than mean_kv / activations on SmolLM2
    attention_init: str = attrs.field(default="fitted_kv", validator=attrs.validators.in_(ATTENTION_METHODS))
    ffn_init: str = attrs.field(default="fitted", validator=attrs.validators.in_(FFN_METHODS))
    linear_init: str = attrs.field(default="lstsq", validator=attrs.validators.in_(LINEAR_METHODS))


def reduced_size(parent_size: int, fraction: float, multiple: int) -> int:
    """``fraction`` of the parent's FFN width, rounded to ``multiple`` (at least ``multiple``)."""
    return max(multiple, round(parent_size * fraction / multiple) * multiple)


class DecoderVariants(VariantProvider):
    """Attention: parent, GQA with fewer KV heads, linear, no-op. FFN: parent, narrower, linear, no-op.

    Register it under your family's name: ``BlockVariantsPlugin(name="qwen2", implementation=DecoderVariants,
    options=DecoderVariantOptions)``.
    """

    def __init__(self, options: DecoderVariantOptions):
        self.options = options
        self.init_method = str(InitMethods(options.attention_init, options.ffn_init, options.linear_init))

    def variants(self, shape: ModelShape, layer: int) -> VariantSpace:
        parent = shape.blocks[layer]
        attention = [parent.attention]
        if self.options.include_gqa:
            heads = shape.num_attention_heads
            attention += [
                AttentionSpec(n_heads_in_group=group)
                for group in range(1, heads + 1)
                if heads % group == 0 and heads // group < shape.num_key_value_heads
            ]
        ffn = [parent.ffn]
        for fraction in self.options.ffn_fractions:
            size = reduced_size(shape.intermediate_size, fraction, self.options.round_to)
            if size < shape.intermediate_size:
                ffn.append(FFNSpec(intermediate_size=size))
        if self.options.include_linear:
            attention.append(AttentionSpec(replace_with_linear=True))
            ffn.append(FFNSpec(replace_with_linear=True))
        if self.options.include_no_op:
            attention.append(AttentionSpec(no_op=True))
            ffn.append(FFNSpec(no_op=True))
        return VariantSpace(attention=tuple(dict.fromkeys(attention)), ffn=tuple(dict.fromkeys(ffn)))
