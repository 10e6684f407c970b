"""The Qwen2 family: Qwen2ForCausalLM parents; children are ``qwen2-nas`` models written by this package."""

from __future__ import annotations

from pathlib import Path

from puzzle_core.api import UserError
from puzzle_core.api.decoder import ChildCode, DecoderFamily


class Qwen2Family(DecoderFamily):
    """Qwen2 and Qwen2.5 dense models: Llama's layout with biases on the q/k/v projections (none on o_proj)."""

    name = "qwen2"
    model_types = ("qwen2",)
    default_variants = "qwen2"
    code = ChildCode(Path(__file__).parent, "configuration_qwen2_nas.Qwen2NASConfig",
                     "modeling_qwen2_nas.Qwen2NASForCausalLM")
    child_model_types = ("qwen2-nas",)

    def shape_fields(self, hf_config):
        if hf_config.get("use_sliding_window"):
            raise UserError(
                "This Qwen2 model uses sliding-window attention (use_sliding_window: true), which the qwen2 "
                "architecture does not build children for. Use a checkpoint with full attention."
            )
        return super().shape_fields(hf_config)
