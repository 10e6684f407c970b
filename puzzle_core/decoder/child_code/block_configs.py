"""Per-layer ``block_configs`` of a heterogeneous decoder (the DeciLM / nemotron-nas layout).

Each ``config.json`` entry ``{"attention": {...}, "ffn": {...}}`` is read into a
:class:`BlockConfig` whose parts are attributes, as NVIDIA's DeciLM configuration makes
them and as vLLM's ``nemotron_nas`` model reads them (``block.attention.no_op``,
``block.ffn.ffn_mult``). An attribute exists exactly when its key does: vLLM asks
``hasattr(block.ffn, "ffn_mult")`` to choose between the ``ffn_mult`` rule and
``intermediate_size``, so a key left out must stay out. ``to_dict`` gives the entry back
unchanged, and :class:`BlockConfigs` saves plain dicts, so a saved config is the config
that was read.

This file imports only the standard library: it is written next to exported weights.
"""

from __future__ import annotations

import dataclasses

_METHODS = ("of", "to_dict")


class BlockConfig:
    """A ``block_configs`` entry (or one part of it) whose keys are attributes; nested dicts are nested objects."""

    def __init__(self, **entries):
        for key, value in entries.items():
            if key in _METHODS or key.startswith("_"):
                raise ValueError(f"a block config cannot have a key called {key!r}")
            self.__dict__[key] = BlockConfig(**value) if isinstance(value, dict) else value

    @classmethod
    def of(cls, entry) -> "BlockConfig":
        """``entry`` as a :class:`BlockConfig`: a dict, a BlockConfig, or any object with attributes (a dataclass)."""
        if isinstance(entry, BlockConfig):
            return entry
        if not isinstance(entry, dict):
            entry = {key: value if isinstance(value, dict) else vars(value) if hasattr(value, "__dict__") else value
                     for key, value in vars(entry).items()}
        return cls(**entry)

    def to_dict(self) -> dict:
        """The entry as plain dicts, keys as they were given."""
        return {key: value.to_dict() if isinstance(value, BlockConfig) else value for key, value in vars(self).items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()!r})"


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is at least ``n``."""
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The published rule: ``2/3 * ffn_mult * hidden``, rounded up to a multiple of 256."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def intermediate_size(ffn: BlockConfig, hidden_size: int) -> int | None:
    """An FFN part's width as vLLM reads it: the ``ffn_mult`` rule when the key exists, else ``intermediate_size``.

    ``None`` for a no-op or linear FFN.
    """
    if getattr(ffn, "no_op", False) or getattr(ffn, "replace_with_linear", False):
        return None
    if hasattr(ffn, "ffn_mult"):
        return ffn_mult_to_intermediate_size(ffn.ffn_mult, hidden_size)
    return ffn.intermediate_size


def has_kv_cache(block: BlockConfig) -> bool:
    """Whether a block's attention keeps a KV cache (a no-op or a linear map does not)."""
    return not (getattr(block.attention, "no_op", False) or getattr(block.attention, "replace_with_linear", False))


def kv_cache_indices(blocks: list[BlockConfig]) -> list[int | None]:
    """Per layer, the index of its KV-cache entry: layers with attention are numbered densely, others get ``None``."""
    indices, cached = [], 0
    for block in blocks:
        indices.append(cached if has_kv_cache(block) else None)
        cached += has_kv_cache(block)
    return indices


@dataclasses.dataclass(repr=False, eq=False)
class BlockConfigs:
    """Put first among the bases of a transformers config class: per-layer ``block_configs`` as :class:`BlockConfig`.

    ``class MyChildConfig(BlockConfigs, MyParentConfig)`` under ``@strict``. The global
    ``intermediate_size`` and ``num_key_value_heads`` stay ``None`` (each block has its
    own); saving writes the entries back as plain dicts.
    """

    block_configs: list | None = None
    intermediate_size: int | None = None
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        per_block = self.num_key_value_heads  # parent config classes fill the global one in from the heads
        super().__post_init__(**kwargs)
        self.num_key_value_heads = per_block
        self.block_configs = [BlockConfig.of(block) for block in self.block_configs or []]
        if self.block_configs and len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs or []]
        return output


__all__ = [
    "BlockConfig",
    "BlockConfigs",
    "find_multiple",
    "ffn_mult_to_intermediate_size",
    "intermediate_size",
    "has_kv_cache",
    "kv_cache_indices",
]
