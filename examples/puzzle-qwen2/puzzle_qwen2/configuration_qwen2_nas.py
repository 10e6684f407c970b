"""Qwen2 children's configuration: Qwen2's fields, and per-layer ``block_configs``.

Written next to every child's weights, with ``block_configs.py``; imports only transformers.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

from .block_configs import BlockConfigs


@strict
class Qwen2NASConfig(BlockConfigs, Qwen2Config):
    """A Qwen2 config whose layers differ: KV heads and FFN width per block, no-op and linear sub-blocks."""

    model_type = "qwen2-nas"
