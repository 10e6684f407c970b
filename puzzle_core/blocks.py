"""The block vocabulary of Puzzle: what a child's attention and FFN sub-blocks can be.

These are the fields of a DeciLM ``block_configs`` entry, kept family-neutral. Every
spec has a stable, human-readable ``id`` (``attn_g3``, ``ffn_768``, ``attn_noop``) and
a block's id joins both (``attn_g9+ffn_768``); ``BlockSpec.parse`` reverses it.
"""

from __future__ import annotations

import attrs

from puzzle_core.errors import UserError


def _one_kind(instance, _attribute, _value):
    if instance.no_op and instance.replace_with_linear:
        raise ValueError("no_op and replace_with_linear cannot both be true")


@attrs.frozen
class AttentionSpec:
    """An attention sub-block: GQA with ``n_heads_in_group`` heads per KV head, linear or no-op."""

    n_heads_in_group: int | None = None
    no_op: bool = attrs.field(default=False, validator=_one_kind)
    replace_with_linear: bool = False

    def __attrs_post_init__(self):
        if not (self.no_op or self.replace_with_linear) and (self.n_heads_in_group or 0) < 1:
            raise ValueError("an attention block needs n_heads_in_group >= 1 unless it is no_op or linear")

    @property
    def id(self) -> str:
        """``attn_g<N>``, ``attn_linear`` or ``attn_noop``."""
        if self.no_op:
            return "attn_noop"
        if self.replace_with_linear:
            return "attn_linear"
        return f"attn_g{self.n_heads_in_group}"

    @property
    def kind(self) -> str:
        """``attention``, ``linear`` or ``no_op``."""
        return "no_op" if self.no_op else "linear" if self.replace_with_linear else "attention"

    @classmethod
    def parse(cls, text: str) -> "AttentionSpec":
        """The spec of an id (:attr:`id` reversed); anything else is a :class:`UserError`."""
        if text == "attn_noop":
            return cls(no_op=True)
        if text == "attn_linear":
            return cls(replace_with_linear=True)
        if text.startswith("attn_g") and text[6:].isdigit():
            return cls(n_heads_in_group=int(text[6:]))
        raise UserError(f"'{text}' is not an attention variant id; expected attn_g<N>, attn_linear or attn_noop.")


@attrs.frozen
class FFNSpec:
    """An FFN sub-block: SwiGLU of ``intermediate_size``, linear or no-op."""

    intermediate_size: int | None = None
    no_op: bool = attrs.field(default=False, validator=_one_kind)
    replace_with_linear: bool = False

    def __attrs_post_init__(self):
        if not (self.no_op or self.replace_with_linear) and (self.intermediate_size or 0) < 1:
            raise ValueError("an FFN block needs intermediate_size >= 1 unless it is no_op or linear")

    @property
    def id(self) -> str:
        """``ffn_<size>``, ``ffn_linear`` or ``ffn_noop``."""
        if self.no_op:
            return "ffn_noop"
        if self.replace_with_linear:
            return "ffn_linear"
        return f"ffn_{self.intermediate_size}"

    @property
    def kind(self) -> str:
        """``ffn``, ``linear`` or ``no_op``."""
        return "no_op" if self.no_op else "linear" if self.replace_with_linear else "ffn"

    @classmethod
    def parse(cls, text: str) -> "FFNSpec":
        """The spec of an id (:attr:`id` reversed); anything else is a :class:`UserError`."""
        if text == "ffn_noop":
            return cls(no_op=True)
        if text == "ffn_linear":
            return cls(replace_with_linear=True)
        if text.startswith("ffn_") and text[4:].isdigit():
            return cls(intermediate_size=int(text[4:]))
        raise UserError(f"'{text}' is not an FFN variant id; expected ffn_<size>, ffn_linear or ffn_noop.")


SubBlockSpec = AttentionSpec | FFNSpec


@attrs.frozen
class BlockSpec:
    """One layer of a child: an attention and an FFN sub-block."""

    attention: AttentionSpec
    ffn: FFNSpec

    @property
    def id(self) -> str:
        """``<attention id>+<ffn id>``, e.g. ``attn_g3+ffn_768``."""
        return f"{self.attention.id}+{self.ffn.id}"

    @classmethod
    def parse(cls, text: str) -> "BlockSpec":
        """The block of an id (:attr:`id` reversed); anything else is a :class:`UserError`."""
        attention, sep, ffn = text.partition("+")
        if not sep:
            raise UserError(f"'{text}' is not a block id; expected '<attention id>+<ffn id>', e.g. attn_g3+ffn_768.")
        return cls(AttentionSpec.parse(attention), FFNSpec.parse(ffn))


@attrs.frozen
class VariantSpace:
    """The alternatives offered for one layer (a provider returns one per layer)."""

    attention: tuple[AttentionSpec, ...]
    ffn: tuple[FFNSpec, ...]

    def blocks(self) -> list[BlockSpec]:
        """Every (attention, FFN) combination."""
        return [BlockSpec(a, f) for a in self.attention for f in self.ffn]
