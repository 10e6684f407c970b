"""Between block specs and ``block_configs`` entries (the DeciLM / nemotron-nas layout, family-neutral)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.decoder.child_code.block_configs import BlockConfig, ffn_mult_to_intermediate_size
from puzzle_core.errors import UserError

# Keys of published block configs that describe features the heterogeneous decoder does not implement.
_UNSUPPORTED_ATTENTION = ("window_length", "num_sink_tokens", "sparsify")
_UNSUPPORTED_FFN = ("sparsify",)


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float | None:
    """An ``ffn_mult`` that the published rule maps back to ``intermediate_size`` exactly, if any."""
    if intermediate_size % 256:
        return None
    mult = round(3 * intermediate_size / (2 * hidden_size), 6)  # the exact ratio, as the published configs write it
    return mult if ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size else None


def block_config(block: BlockSpec, hidden_size: int) -> dict:
    """The ``block_configs`` entry of one layer.

    Sizes the ``ffn_mult`` rule can produce are written as ``ffn_mult`` (as the published
    models do); any other size as ``intermediate_size`` with no ``ffn_mult`` key, because
    vLLM reads ``ffn_mult`` whenever the key is present.
    """
    attention, ffn = block.attention, block.ffn
    attention_entry = {
        "n_heads_in_group": None if attention.no_op or attention.replace_with_linear else attention.n_heads_in_group,
        "no_op": attention.no_op,
        "replace_with_linear": attention.replace_with_linear,
        "window_length": None,
        "num_sink_tokens": None,
        "sparsify": None,
        "unshifted_sink": False,
        "use_prefill_window_in_sink": False,
    }
    ffn_entry: dict[str, Any] = {"no_op": ffn.no_op, "replace_with_linear": ffn.replace_with_linear, "sparsify": None}
    if ffn.kind == "ffn":
        mult = ffn_mult_for(ffn.intermediate_size, hidden_size)
        if mult is not None:
            ffn_entry["ffn_mult"] = mult
        else:
            ffn_entry["intermediate_size"] = ffn.intermediate_size
    else:
        ffn_entry["ffn_mult"] = None
    return {"attention": attention_entry, "ffn": ffn_entry}


def _ffn_size(ffn: Mapping[str, Any], hidden_size: int, where: str) -> int | None:
    """The FFN width as vLLM reads it: ``ffn_mult`` whenever the key is present, else ``intermediate_size``."""
    if ffn.get("no_op") or ffn.get("replace_with_linear"):
        return None
    if "ffn_mult" in ffn:
        if ffn["ffn_mult"] is None:
            raise UserError(
                f"{where}: an FFN block has ffn_mult null and is neither no_op nor linear. Readers such as vLLM take "
                f"ffn_mult whenever the key is present; give its value, or drop the key and give intermediate_size."
            )
        return ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden_size)
    return ffn.get("intermediate_size")


def block_spec(entry: Mapping[str, Any] | BlockConfig, hidden_size: int, where: str = "config") -> BlockSpec:
    """Our spec of one ``block_configs`` entry; unsupported features are a UserError."""
    try:
        entry = BlockConfig.of(entry).to_dict()
        attention, ffn = dict(entry["attention"]), dict(entry["ffn"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where}: a block_configs entry must have 'attention' and 'ffn' mappings, got {entry!r}.")
    for key in _UNSUPPORTED_ATTENTION:
        if attention.get(key):
            raise UserError(f"{where}: attention '{key}' = {attention[key]!r} is not supported; only full attention is.")
    for key in _UNSUPPORTED_FFN:
        if ffn.get(key):
            raise UserError(f"{where}: FFN '{key}' = {ffn[key]!r} is not supported.")
    try:
        attention_spec = AttentionSpec(
            n_heads_in_group=attention.get("n_heads_in_group"),
            no_op=bool(attention.get("no_op")),
            replace_with_linear=bool(attention.get("replace_with_linear")),
        )
        ffn_spec = FFNSpec(
            intermediate_size=_ffn_size(ffn, hidden_size, where),
            no_op=bool(ffn.get("no_op")),
            replace_with_linear=bool(ffn.get("replace_with_linear")),
        )
    except ValueError as exc:
        raise UserError(f"{where}: invalid block config {entry!r}: {exc}.") from None
    return BlockSpec(attention_spec, ffn_spec)


def block_specs(entries: Sequence[Mapping[str, Any] | BlockConfig], hidden_size: int,
                source: str = "config") -> list[BlockSpec]:
    """:func:`block_spec` of every layer's entry."""
    return [block_spec(e, hidden_size, f"{source}, layer {i}") for i, e in enumerate(entries)]
