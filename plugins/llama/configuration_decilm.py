"""DeciLM ("nemotron-nas") configuration: a Llama config whose layers differ (``block_configs``).

The entries of ``block_configs`` are read into objects whose keys are attributes (see
``block_configs.py``), as NVIDIA's DeciLM configuration makes them and vLLM's
``nemotron_nas`` model reads them, and saved back as plain dicts. This file imports only
transformers and its neighbours, so it sits next to exported weights.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

from .block_configs import BlockConfigs


@strict
class DeciLMConfig(BlockConfigs, LlamaConfig):
    """Llama fields plus per-layer ``block_configs``; global KV heads / FFN size are per block."""

    model_type = "nemotron-nas"


__all__ = ["DeciLMConfig"]
