"""Test helpers: tiny random Llama parents built in code (no cache, no downloads)."""

from __future__ import annotations

import torch

from puzzle_core.interfaces import LoadedModel

TINY_RUN = {  # the start of a run config on the tiny parent and synthetic text
    "parent": {"source": "tiny-random-llama"},
    "seed": 0,
    "threads": 1,
    "data": {"corpus": "synthetic", "seq_len": 32},
}


def llama_family():
    from puzzle_core.registry import get_registries

    return get_registries().architectures.get("llama").create()


def tiny_parent(seed: int = 0, tie_word_embeddings: bool = False, num_layers: int = 4) -> tuple:
    """``(family, parent)``: a seeded Llama (hidden 64, 4 heads / 2 KV heads, FFN 128) with a byte tokenizer."""
    from transformers import LlamaForCausalLM

    from puzzle_plugins.llama.aliases import byte_tokenizer, tiny_llama_config

    family = llama_family()
    tokenizer = byte_tokenizer()
    config = tiny_llama_config(len(tokenizer))
    config.tie_word_embeddings = tie_word_embeddings
    config.num_hidden_layers = num_layers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    return family, LoadedModel(model, tokenizer, family.shape(config.to_dict()), source="tiny")


def token_batch(batch: int = 2, length: int = 12, vocab: int = 260, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=generator)
