"""Child checkpoints in the DeciLM / nemotron-nas layout, and loading them back.

An export is ``config.json`` (``block_configs``, ``auto_map``), safetensors weights with
the published tensor names, the tokenizer, and ``configuration_decilm.py`` /
``modeling_decilm.py`` copied verbatim, so plain transformers loads it with
``trust_remote_code=True`` and nothing of ours installed.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from puzzle_core.api import LoadedModel, UserError, atomic_dir, read_config

CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}


class LinearReplacementWarning(UserWarning):
    """The child uses ``replace_with_linear``, which vLLM's DeciLM loader cannot build."""


def export_child(family, child: LoadedModel, out_dir: Path) -> None:
    """Write ``child`` (a DeciLM model, or a plain parent-shaped Llama) to ``out_dir``."""
    from puzzle_plugins.llama.modeling_decilm import DeciLMForCausalLM

    model = child.model
    if not isinstance(model, DeciLMForCausalLM):  # a parent-shaped model: same tensors, DeciLM config
        model = family.build_child(child, child.shape.blocks).model
    linear = [i for i, b in enumerate(child.shape.blocks) if b.attention.replace_with_linear or b.ffn.replace_with_linear]
    if linear:
        warnings.warn(
            f"The child uses replace_with_linear in layer(s) {linear}: transformers loads it, but vLLM's "
            f"DeciLM (nemotron-nas) loader has no branch for linear replacements and will fail on it.",
            LinearReplacementWarning,
            stacklevel=3,
        )
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["DeciLMForCausalLM"]
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if child.tokenizer is not None:
            child.tokenizer.save_pretrained(tmp)
        here = Path(__file__).parent
        for name in CODE_FILES:
            shutil.copyfile(here / name, tmp / name)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded with an index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{folder} has no model.safetensors (or sharded index); export the child again.")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            weights.update(load_file(str(folder / name)))
        except SafetensorError as exc:
            raise UserError(f"{folder / name} cannot be read ({exc}): it is truncated or damaged. Export the child again.") from None
    return weights


def load_child(family, folder: Path, dtype: torch.dtype) -> LoadedModel:
    """Load a DeciLM folder (ours or published-style) with our model code; checks weights against block_configs."""
    from transformers import AutoTokenizer

    from puzzle_plugins.llama.configuration_decilm import DeciLMConfig
    from puzzle_plugins.llama.family import DECILM_MODEL_TYPES, uninitialised_child

    if not folder.is_dir():
        raise UserError(f"Child checkpoint {folder} does not exist; pass a folder written by 'puzzle model assemble'.")
    raw = read_config(folder)
    if raw.get("model_type") not in DECILM_MODEL_TYPES or not raw.get("block_configs"):
        if family.detect(raw):
            return family.load_parent(str(folder), dtype=str(dtype).removeprefix("torch."))
        raise UserError(f"{folder} is not a DeciLM child (model_type {raw.get('model_type')!r}, no block_configs).")
    shape = family.shape(raw)  # validates block_configs
    config = DeciLMConfig.from_pretrained(folder)
    model = uninitialised_child(config, torch.float32)
    weights = read_weights(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k} is {tuple(weights[k].shape)}, expected {shape_}"
        for k, shape_ in expected.items()
        if k in weights and tuple(weights[k].shape) != shape_
    ]
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(
            f"The block_configs in {folder / 'config.json'} disagree with the weights: {listed}. "
            f"The config and the safetensors files must come from the same export."
        )
    model.load_state_dict(weights, strict=True)
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return LoadedModel(model=model, tokenizer=tokenizer, shape=shape, source=str(folder))
