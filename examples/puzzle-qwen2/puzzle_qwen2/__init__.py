"""puzzle-qwen2: the Qwen2 architecture for puzzle, and its block variants.

Registration stays cheap: the family (and with it transformers) is imported only when a run
or a ``puzzle model`` command builds it.
"""

from __future__ import annotations

from puzzle_core.api import (
    ArchitecturePlugin,
    BlockVariantsPlugin,
    DecoderVariantOptions,
    DecoderVariants,
    ModelFamily,
    NoOptions,
    hookimpl,
)


def qwen2_family(_options: NoOptions) -> ModelFamily:
    from puzzle_qwen2.family import Qwen2Family

    return Qwen2Family()


@hookimpl
def puzzle_architectures() -> list[ArchitecturePlugin]:
    return [ArchitecturePlugin(name="qwen2", implementation=qwen2_family,
                               description="Qwen2ForCausalLM (Qwen2, Qwen2.5); children keep its q/k/v biases")]


@hookimpl
def puzzle_block_variants() -> list[BlockVariantsPlugin]:
    return [BlockVariantsPlugin(name="qwen2", implementation=DecoderVariants, options=DecoderVariantOptions,
                                description="GQA with fewer KV heads, narrower SwiGLU, linear and no-op sub-blocks")]
