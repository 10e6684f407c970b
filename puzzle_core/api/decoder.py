"""What a model family builds on: the heterogeneous child, sub-block initialisation, running and exporting.

Imports torch and transformers, so a plugin imports it where it builds models (inside
the factory its architecture record names), not at registration.

- :class:`DecoderFamily`: a complete ``ModelFamily`` for decoder-only transformers with
  the usual module names; a family subclasses it, names its :class:`ChildCode`, and
  overrides what differs (config field names, loading, initialisation).
- :class:`ChildCode`: a family's configuration and modeling files, written next to every
  child and loaded in this process exactly as exported. Those files subclass the shared
  ones, which they import relatively (``from .heterogeneous_decoder import ...``):
  ``block_configs.py`` (``BlockConfig``: ``block_configs`` entries read by attribute as
  vLLM does; ``BlockConfigs``, the config mixin) and ``heterogeneous_decoder.py``
  (``HeterogeneousModel`` / ``HeterogeneousForCausalLM``: per-layer sub-blocks, dense KV-cache
  indexing with no-op layers; ``GroupedQueryAttention``, ``GatedMLP``), documented with the API.
- Sub-block initialisation from the parent: :func:`init_sublayer` and its parts
  (:func:`merge_kv_heads`, :func:`channel_importance`, :func:`important_channels`,
  :func:`keep_channels`, :func:`fit_down_projection`, :func:`fit_linear`), chosen by an :class:`~puzzle_core.api.InitMethods`.
- Running a model one sub-block at a time: :class:`DecoderLayerRunner`, :class:`AttentionSublayer`,
  :class:`FFNSublayer`, :func:`layer_sublayer`.
- ``block_configs`` entries: :func:`block_config`, :func:`block_spec`, :func:`block_specs`;
  checkpoints: :func:`read_safetensors`, :func:`tensor_mismatches`.
"""

from __future__ import annotations

from puzzle_core.decoder.checkpoint import read_safetensors, tensor_mismatches
from puzzle_core.decoder.code import ChildCode
from puzzle_core.decoder.family import ARCHITECTURE_KEY, DecoderFamily
from puzzle_core.decoder.init import (
    KVHeadLayout,
    channel_importance,
    fit_down_projection,
    fit_linear,
    important_channels,
    init_attention,
    init_ffn,
    init_sublayer,
    keep_channels,
    merge_kv_heads,
)
from puzzle_core.decoder.runner import AttentionSublayer, DecoderContext, DecoderLayerRunner, FFNSublayer, layer_sublayer
from puzzle_core.decoder.specs import block_config, block_spec, block_specs

__all__ = [
    "DecoderFamily",
    "ChildCode",
    "ARCHITECTURE_KEY",
    "init_sublayer",
    "init_attention",
    "init_ffn",
    "merge_kv_heads",
    "KVHeadLayout",
    "channel_importance",
    "important_channels",
    "keep_channels",
    "fit_down_projection",
    "fit_linear",
    "DecoderLayerRunner",
    "DecoderContext",
    "AttentionSublayer",
    "FFNSublayer",
    "layer_sublayer",
    "block_config",
    "block_spec",
    "block_specs",
    "read_safetensors",
    "tensor_mismatches",
]
