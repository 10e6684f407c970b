"""The block variants offered for a Llama-family layer, and how they are initialised."""

from __future__ import annotations

from puzzle_core.api import AttentionSpec, FFNSpec, ModelShape, VariantProvider, VariantSpace
from puzzle_plugins.llama.init import InitMethods
from puzzle_plugins.llama.options import LlamaVariantOptions


def reduced_size(parent_size: int, fraction: float, multiple: int) -> int:
    """``fraction`` of the parent's FFN width, rounded to ``multiple`` (at least ``multiple``)."""
    return max(multiple, round(parent_size * fraction / multiple) * multiple)


class LlamaVariants(VariantProvider):
    """Attention: parent, GQA with fewer KV heads, linear, no-op. FFN: parent, narrower, linear, no-op."""

    def __init__(self, options: LlamaVariantOptions):
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
