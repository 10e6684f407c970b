"""Running a decoder-only model (a parent or a heterogeneous child) one sub-block at a time.

The models are those with the module layout transformers' decoders share:
``model.embed_tokens``, ``model.rotary_emb``, ``model.layers[i].{input_layernorm,
self_attn, post_attention_layernorm, mlp}``, ``model.norm`` and ``lm_head``, attention
called as ``self_attn(hidden, position_embeddings=..., attention_mask=...)``.

A sub-block module maps ``(hidden, context)`` to the delta it adds to the residual
stream, its norm included. Its sub-modules are registered under the names they have in
a decoder layer, so its ``state_dict`` keys are the layer's own tensor names: that is
what BLD saves and what :meth:`DecoderFamily.build_child` loads into ``model.layers.N``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from puzzle_core.interfaces import LayerRunner, Part


@attrs.frozen
class DecoderContext:
    """What attention needs besides the hidden states: rotary tables, the mask, positions."""

    position_embeddings: tuple[Any, Any]
    attention_mask: Any
    position_ids: Any


class AttentionSublayer(nn.Module):
    """``attn(input_layernorm(h))``; zeros when the attention is a no-op (``self_attn`` is None)."""

    def __init__(self, input_layernorm: nn.Module | None, self_attn: nn.Module | None):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn

    def forward(self, hidden, context: DecoderContext):
        if self.self_attn is None:
            return torch.zeros_like(hidden)
        output, _ = self.self_attn(
            self.input_layernorm(hidden),
            position_embeddings=context.position_embeddings,
            attention_mask=context.attention_mask,
        )
        return output


class FFNSublayer(nn.Module):
    """``mlp(post_attention_layernorm(h))``; zeros when the FFN is a no-op (``mlp`` is None)."""

    def __init__(self, post_attention_layernorm: nn.Module | None, mlp: nn.Module | None):
        super().__init__()
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def forward(self, hidden, context: DecoderContext | None = None):
        if self.mlp is None:
            return torch.zeros_like(hidden)
        return self.mlp(self.post_attention_layernorm(hidden))


def layer_sublayer(layer: nn.Module, part: Part) -> nn.Module:
    """The sub-block ``part`` of a decoder layer, sharing its parameters."""
    if part == "attention":
        return AttentionSublayer(getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None))
    if part == "ffn":
        return FFNSublayer(getattr(layer, "post_attention_layernorm", None), getattr(layer, "mlp", None))
    raise ValueError(f"part must be 'attention' or 'ffn', got {part!r}")


class DecoderLayerRunner(LayerRunner):
    """Embed, per-layer sub-blocks and head of a ``*ForCausalLM`` with the usual decoder module names."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = model.model
        self.num_layers = len(self.base.layers)
        self._sublayers: dict[tuple[int, str], nn.Module] = {}

    def embed(self, input_ids):
        return self.base.embed_tokens(input_ids)

    def context(self, hidden, attention_mask=None) -> DecoderContext:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        return DecoderContext(self.base.rotary_emb(hidden, position_ids=position_ids), mask, position_ids)

    def sublayer(self, layer: int, part: Part) -> nn.Module:
        key = (layer, part)
        if key not in self._sublayers:
            self._sublayers[key] = layer_sublayer(self.base.layers[layer], part)
        return self._sublayers[key]

    def head(self, hidden):
        return self.model.lm_head(self.base.norm(hidden))

    def head_projection(self):
        lm_head = self.model.lm_head
        if type(lm_head) is not nn.Linear or lm_head.bias is not None:
            return None  # e.g. wrapped by LoRA: only head() knows what it computes
        return self.base.norm, lm_head.weight
