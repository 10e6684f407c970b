"""The Llama family: LlamaForCausalLM and look-alikes (RMSNorm, SwiGLU, RoPE, GQA); DeciLM children.

Children are DeciLM ("nemotron-nas") models, the layout of the published Puzzle models:
``configuration_decilm.py`` and ``modeling_decilm.py`` here (Llama's norm and rotary
embedding on the shared heterogeneous decoder) are written next to every child's weights.
Parents also come from GGUF files, and two need no download (``aliases``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Mapping

from puzzle_core.api import LoadedModel, torch_dtype
from puzzle_core.api.decoder import ChildCode, DecoderFamily


class LinearReplacementWarning(UserWarning):
    """The child uses ``replace_with_linear``, which vLLM's DeciLM loader cannot build."""


class LlamaFamily(DecoderFamily):
    """LlamaForCausalLM (Llama 2/3, SmolLM2, TinyLlama...) and DeciLM children, published ones included."""

    name = "llama"
    model_types = ("llama",)
    default_variants = "llama"
    code = ChildCode(Path(__file__).parent, "configuration_decilm.DeciLMConfig", "modeling_decilm.DeciLMForCausalLM")
    child_model_types = ("nemotron-nas", "deci")
    unmarked_children = "llama"  # published Puzzle models (Nemotron-51B...) are Llama children

    def aliases(self) -> Mapping[str, Callable[[], Path]]:
        from puzzle_plugins.llama.aliases import ALIASES

        return ALIASES

    def load_parent(self, source: str, dtype: str = "fp32", trust_remote_code: bool = False) -> LoadedModel:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            from puzzle_plugins.llama.gguf import load_gguf

            return self.loaded(*load_gguf(path, torch_dtype(dtype)), source=str(path))
        return super().load_parent(source, dtype, trust_remote_code)

    def export(self, child: LoadedModel, out_dir: Path) -> None:
        """The DeciLM layout; a warning when vLLM's nemotron_nas loader could not build the child."""
        linear = [i for i, b in enumerate(child.shape.blocks) if b.attention.replace_with_linear or b.ffn.replace_with_linear]
        if linear:
            warnings.warn(
                f"The child uses replace_with_linear in layer(s) {linear}: transformers loads it, but vLLM's "
                f"DeciLM (nemotron-nas) loader has no branch for linear replacements and will fail on it.",
                LinearReplacementWarning,
                stacklevel=2,
            )
        super().export(child, out_dir)
