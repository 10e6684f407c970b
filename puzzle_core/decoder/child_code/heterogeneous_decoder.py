"""A heterogeneous decoder: a causal LM whose layers each have their own attention and FFN.

Per layer (``config.block_configs``) the attention is grouped-query attention with its
own number of KV heads, one hidden->hidden linear map, or absent (no-op); the FFN is a
gated MLP of its own width, a linear map, or absent. Norms and residuals are kept around
linear maps; a no-op sub-block has neither norm nor KV-cache entry, and the layers that
cache keys and values are numbered densely. Tensor names are those of Llama-style
checkpoints (``model.layers.N.self_attn.q_proj.weight``...), plus ``linear_attn`` and
``linear_mlp`` for linear replacements.

A model family's own modeling file subclasses :class:`HeterogeneousModel` (naming its
norm and rotary-embedding classes, and overriding :meth:`~HeterogeneousModel.make_attention`
or :meth:`~HeterogeneousModel.make_mlp` where its modules differ, e.g. biases) and
:class:`HeterogeneousForCausalLM`. This file imports only torch and transformers: it is
written next to exported weights, so children load without the package that made them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .block_configs import BlockConfig, intermediate_size, kv_cache_indices


def _past(kwargs: dict, cache):
    """The KV cache, whichever name the caller used for it."""
    return cache if cache is not None else kwargs.pop("past_key_values", None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(query, key, cos, sin):
    """Rotary position embedding on ``(batch, heads, seq, head_dim)`` queries and keys (half-split layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Softmax attention in plain torch, KV heads repeated for their query groups."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_biases(config) -> tuple[bool, bool]:
    """``(q/k/v bias, o bias)`` as vLLM's nemotron_nas reads them: ``attention_bias`` (or ``bias``) for all four,
    unless a ``qkv_bias`` attribute overrides the first three."""
    bias = bool(getattr(config, "attention_bias", False) or getattr(config, "bias", False))
    return (bool(config.qkv_bias) if hasattr(config, "qkv_bias") else bias), bias


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class GroupedQueryAttention(nn.Module):
    """Attention with its own number of KV heads; ``cache_index`` is this layer's entry in the KV cache."""

    def __init__(self, config, num_key_value_heads: int, cache_index: int, qkv_bias: bool = False,
                 o_bias: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = cache_index
        self.head_dim = head_dim(config)
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        heads = config.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, heads, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads, config.hidden_size, bias=o_bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = _past(kwargs, cache)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` of its own width (SwiGLU with ``hidden_act`` silu)."""

    def __init__(self, config, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearAttention(nn.Module):
    """Attention replaced by one hidden->hidden linear map (no KV cache)."""

    def __init__(self, config):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        return self.linear_attn(hidden_states), None


class LinearMLP(nn.Module):
    """FFN replaced by one hidden->hidden linear map."""

    def __init__(self, config):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class HeterogeneousDecoderLayer(GradientCheckpointingLayer):
    """``h += attn(norm(h)); h += mlp(norm(h))``, each part left out entirely when it is a no-op (``None``)."""

    def __init__(self, self_attn, input_layernorm, mlp, post_attention_layernorm):
        super().__init__()
        self.self_attn = self_attn
        self.input_layernorm = input_layernorm
        self.mlp = mlp
        self.post_attention_layernorm = post_attention_layernorm

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


class HeterogeneousPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HeterogeneousDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class HeterogeneousModel(HeterogeneousPreTrainedModel):
    """Embedding, per-block layers, final norm. A family sets ``config_class``, ``norm_class`` and ``rotary_class``.

    The ``make_*`` class methods build the parts of a layer; a family overrides them where
    its modules differ from the defaults (a Qwen2 attention has biases on q/k/v only).
    """

    norm_class: type[nn.Module]  # called as norm_class(hidden_size, eps=config.rms_norm_eps)
    rotary_class: type[nn.Module]  # called as rotary_class(config=config); returns (cos, sin)

    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        blocks = [BlockConfig.of(block) for block in config.block_configs]
        cache_indices = kv_cache_indices(blocks)
        self.num_cached_layers = sum(index is not None for index in cache_indices)
        self.layers = nn.ModuleList(self.make_layer(config, block, index) for block, index in zip(blocks, cache_indices))
        self.norm = self.make_norm(config)
        self.rotary_emb = self.rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @classmethod
    def make_norm(cls, config) -> nn.Module:
        return cls.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    @classmethod
    def make_attention(cls, config, num_key_value_heads: int, cache_index: int) -> nn.Module:
        """The attention of a block with ``num_key_value_heads`` (biases as vLLM reads them from the config)."""
        qkv_bias, o_bias = attention_biases(config)
        return GroupedQueryAttention(config, num_key_value_heads, cache_index, qkv_bias=qkv_bias, o_bias=o_bias)

    @classmethod
    def make_mlp(cls, config, intermediate_size: int) -> nn.Module:
        """The FFN of a block of width ``intermediate_size``."""
        return GatedMLP(config, intermediate_size, bias=bool(getattr(config, "mlp_bias", False)))

    @classmethod
    def make_layer(cls, config, block: BlockConfig, cache_index: int | None) -> HeterogeneousDecoderLayer:
        """One layer as ``block`` describes it (also how a family builds a single sub-block to initialise)."""
        attention, ffn = block.attention, block.ffn
        if getattr(attention, "no_op", False):
            self_attn = None
        elif getattr(attention, "replace_with_linear", False):
            self_attn = LinearAttention(config)
        else:
            self_attn = cls.make_attention(config, config.num_attention_heads // attention.n_heads_in_group, cache_index)
        if getattr(ffn, "no_op", False):
            mlp = None
        elif getattr(ffn, "replace_with_linear", False):
            mlp = LinearMLP(config)
        else:
            mlp = cls.make_mlp(config, intermediate_size(ffn, config.hidden_size))
        return HeterogeneousDecoderLayer(
            self_attn, cls.make_norm(config) if self_attn is not None else None,
            mlp, cls.make_norm(config) if mlp is not None else None,
        )

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
            cache = DynamicCache()  # entries are made per cached layer, so no-op layers take none
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen
        causal_mask = None
        if self.num_cached_layers:
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids,
            )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states, attention_mask=causal_mask, position_ids=position_ids, cache=cache,
                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
            )
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states  # as transformers reports it: the last entry is after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )


class HeterogeneousForCausalLM(HeterogeneousPreTrainedModel, GenerationMixin):
    """The model plus the LM head. A family sets ``config_class`` and ``base_model_class`` (its HeterogeneousModel)."""

    base_model_class: type[HeterogeneousModel]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None, **kwargs):
        cache = _past(kwargs, cache)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states, **kwargs,
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
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)


__all__ = [
    "GroupedQueryAttention",
    "GatedMLP",
    "LinearAttention",
    "LinearMLP",
    "HeterogeneousDecoderLayer",
    "HeterogeneousPreTrainedModel",
    "HeterogeneousModel",
    "HeterogeneousForCausalLM",
    "apply_rotary",
    "attention_biases",
    "eager_attention",
]
