"""A parent with the weights of a few layers only: what one BLD job needs once activations are captured.

The model is built on the meta device (no memory), the rotary tables are rebuilt on the
CPU, and only the tensors of the requested layers are read from the safetensors files
(``safe_open`` reads each tensor on its own, so a 70B parent costs one layer's bytes).
Every other parameter stays on the meta device: running anything but those layers fails
loudly instead of computing with garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from puzzle_core.errors import UserError
from puzzle_core.interfaces import LoadedModel


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


ENDS = ("model.embed_tokens.", "model.norm.", "lm_head.")


def read_layer_tensors(folder: Path, layers: Sequence[int], dtype: torch.dtype,
                       ends: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``layers`` (and of the embeddings, final norm and head with ``ends``) in ``folder``."""
    from safetensors import safe_open

    prefixes = tuple(layer_prefix(layer) for layer in layers) + (ENDS if ends else ())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key).to(dtype)
    return tensors


def load_parent_layers(family, folder: Path, layers: Sequence[int], dtype: torch.dtype,
                       trust_remote_code: bool = False, ends: bool = False) -> LoadedModel:
    """The parent in ``folder`` with real weights for ``layers`` only (``ends``: and the embeddings, final norm and
    LM head, tied or not), and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    base = model.model
    base.rotary_emb = type(base.rotary_emb)(config=model.config)  # its tables are computed, not stored
    tensors = read_layer_tensors(folder, layers, dtype, ends)
    if ends:
        for name in ("embed_tokens", "norm"):
            getattr(base, name).to_empty(device="cpu")
            getattr(base, name).load_state_dict({"weight": tensors[f"model.{name}.weight"]})
        if model.config.tie_word_embeddings:
            model.lm_head.weight = base.embed_tokens.weight
        else:
            model.lm_head.to_empty(device="cpu")
            model.lm_head.load_state_dict({"weight": tensors["lm_head.weight"]})
    for layer in layers:
        module, prefix = base.layers[layer], layer_prefix(layer)
        module.to_empty(device="cpu")
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"The weights of layer {layer} in {folder} do not match its config (missing: {missing[:3]}, "
                f"unexpected: {unexpected[:3]}). Copy or export the model again."
            )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, shape=family.shape(config.to_dict()), source=str(folder))
