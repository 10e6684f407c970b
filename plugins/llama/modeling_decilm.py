"""DeciLM ("nemotron-nas"): a Llama whose layers each have their own attention and FFN.

The heterogeneous decoder (``heterogeneous_decoder.py``) with Llama's norm and rotary
embedding; attention biases follow the config as vLLM reads them. Tensor names are those
of the published Puzzle models, so serving engines that know this layout load the same
weights. This file imports only transformers and its neighbours, so it sits next to
exported weights.
"""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_decilm import DeciLMConfig
from .heterogeneous_decoder import HeterogeneousForCausalLM, HeterogeneousModel


class DeciLMModel(HeterogeneousModel):
    config_class = DeciLMConfig
    norm_class = LlamaRMSNorm
    rotary_class = LlamaRotaryEmbedding


class DeciLMForCausalLM(HeterogeneousForCausalLM):
    config_class = DeciLMConfig
    base_model_class = DeciLMModel


__all__ = ["DeciLMForCausalLM", "DeciLMModel"]
