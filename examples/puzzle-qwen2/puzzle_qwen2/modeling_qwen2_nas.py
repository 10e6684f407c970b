"""Qwen2 children: the heterogeneous decoder with Qwen2's norm and rotary embedding, and biases on q/k/v only.

Written next to every child's weights, with ``heterogeneous_decoder.py``; imports only
torch and transformers, so children load without puzzle installed.
"""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding

from .configuration_qwen2_nas import Qwen2NASConfig
from .heterogeneous_decoder import GroupedQueryAttention, HeterogeneousForCausalLM, HeterogeneousModel


class Qwen2NASModel(HeterogeneousModel):
    config_class = Qwen2NASConfig
    norm_class = Qwen2RMSNorm
    rotary_class = Qwen2RotaryEmbedding

    @classmethod
    def make_attention(cls, config, num_key_value_heads, cache_index):
        return GroupedQueryAttention(config, num_key_value_heads, cache_index, qkv_bias=True, o_bias=False)


class Qwen2NASForCausalLM(HeterogeneousForCausalLM):
    config_class = Qwen2NASConfig
    base_model_class = Qwen2NASModel
