"""Loading a Llama-family parent from a GGUF file (de-quantised by transformers)."""

from __future__ import annotations

from pathlib import Path

from puzzle_core.api import UserError

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header only)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on damaged files
        raise UserError(f"{path} could not be read as a GGUF file ({type(exc).__name__}: {exc}).") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path} has no general.architecture key; it is not a model GGUF file.")
    return bytes(field.parts[field.data[0]]).decode()


def load_gguf(path: Path, dtype):
    """``(model, tokenizer)`` from a GGUF file; an unsupported architecture is a UserError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(path)
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UserError(
            f"{path} holds a '{architecture}' model; GGUF parents must be one of "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}. Convert it to a Hugging Face folder, or use a Llama-family GGUF."
        )
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are de-quantised on load; a saved copy must not claim to be quantised.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attribute in ("is_quantized", "hf_quantizer"):
        if getattr(model, attribute, None):
            setattr(model, attribute, None if attribute == "hf_quantizer" else False)
    return model, tokenizer
