"""DeciLM ("nemotron-nas") configuration: a Llama config whose layers differ.

``block_configs`` holds one ``{"attention": {...}, "ffn": {...}}`` entry per layer,
in the layout of the published Puzzle models. This file imports only transformers, so
it can sit next to exported weights and load without the package that wrote it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is at least ``n``."""
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The published rule: ``2/3 * ffn_mult * hidden``, rounded up to a multiple of 256."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def block_intermediate_size(ffn: dict, hidden_size: int) -> int | None:
    """An FFN block's size: from ``ffn_mult`` when present (as vLLM reads it), else ``intermediate_size``."""
    if ffn.get("no_op") or ffn.get("replace_with_linear"):
        return None
    if ffn.get("ffn_mult") is not None:
        return ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden_size)
    return ffn.get("intermediate_size")


@strict
class DeciLMConfig(LlamaConfig):
    """Llama fields plus per-layer ``block_configs``; global KV heads / FFN size are per block."""

    model_type = "nemotron-nas"

    block_configs: list | None = None
    intermediate_size: int | None = None

    def __post_init__(self, **kwargs):
        keep_kv_heads = self.num_key_value_heads  # per block; LlamaConfig would fill the global one in
        super().__post_init__(**kwargs)
        self.num_key_value_heads = keep_kv_heads
        self.block_configs = [_plain(block) for block in self.block_configs or []]
        if self.block_configs and len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )


def _plain(block) -> dict:
    """A block config as plain dicts (published files sometimes hold nested objects)."""
    if not isinstance(block, dict):
        block = vars(block)
    return {part: dict(vars(value) if not isinstance(value, dict) else value) for part, value in block.items()}


__all__ = ["DeciLMConfig"]
