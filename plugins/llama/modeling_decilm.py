"""DeciLM ("nemotron-nas"): a Llama whose layers each have their own attention and FFN.

Per layer (``config.block_configs``) the attention is GQA with its own number of KV
heads, a single hidden->hidden linear map, or absent (no-op); the FFN is a SwiGLU of its
own width, a linear map, or absent. Norms and residuals are kept around linear maps; a
no-op sub-block has neither norm nor KV-cache entry. Tensor names follow the published
Puzzle models, so serving engines that know this layout load the same weights.

The parent's numerics are reproduced by construction: the norm, rotary embedding,
rotation and attention kernels are transformers' own Llama functions. This file
imports only torch and transformers, so it can sit next to exported weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_decilm import DeciLMConfig, block_intermediate_size


def _past(kwargs: dict, cache):
    """The KV cache, whichever name the caller used for it."""
    return cache if cache is not None else kwargs.pop("past_key_values", None)


class DeciLMAttention(nn.Module):
    """Llama attention with its own number of KV heads; ``cache_index`` counts only cached layers."""

    def __init__(self, config: DeciLMConfig, num_key_value_heads: int, cache_index: int):
        super().__init__()
        self.config = config
        self.layer_idx = cache_index
        self.head_dim = config.head_dim
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = _past(kwargs, cache)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one hidden->hidden linear map (no KV cache)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        return self.linear_attn(hidden_states), None


class DeciLMMLP(nn.Module):
    """SwiGLU feed-forward of a per-block width."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one hidden->hidden linear map."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


def make_attention(config: DeciLMConfig, block: dict, cache_index: int) -> nn.Module | None:
    """The attention module a block config asks for (``None`` for a no-op)."""
    attention = block["attention"]
    if attention.get("no_op"):
        return None
    if attention.get("replace_with_linear"):
        return DeciLMLinearAttention(config)
    return DeciLMAttention(config, config.num_attention_heads // attention["n_heads_in_group"], cache_index)


def make_mlp(config: DeciLMConfig, block: dict) -> nn.Module | None:
    """The FFN module a block config asks for (``None`` for a no-op)."""
    ffn = block["ffn"]
    if ffn.get("no_op"):
        return None
    if ffn.get("replace_with_linear"):
        return DeciLMLinearMLP(config)
    return DeciLMMLP(config, block_intermediate_size(ffn, config.hidden_size))


def has_kv_cache(block: dict) -> bool:
    attention = block["attention"]
    return not (attention.get("no_op") or attention.get("replace_with_linear"))


class DeciLMDecoderLayer(GradientCheckpointingLayer):
    """``h += attn(norm(h)); h += mlp(norm(h))``, each part skipped entirely when it is a no-op."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.hidden_size = config.hidden_size
        self.self_attn = make_attention(config, block, cache_index)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps) if self.self_attn else None
        self.mlp = make_mlp(config, block)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps) if self.mlp else None

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            attended, _ = self.self_attn(
                self.input_layernorm(hidden_states),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        cache_indices, cached = [], 0
        for block in config.block_configs:
            cache_indices.append(cached)
            cached += has_kv_cache(block)
        self.num_cached_layers = cached
        self.layers = nn.ModuleList(
            DeciLMDecoderLayer(config, index, cache_indices[index]) for index in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, **kwargs):
        cache = _past(kwargs, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if use_cache and cache is None:
            cache = DynamicCache()  # cached layers are numbered densely, so no-op layers take no entry
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen
        causal_mask = None
        if self.num_cached_layers:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states  # as Llama reports it: the last entry is after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None, **kwargs):
        cache = _past(kwargs, cache)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = ["DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel"]
