"""The Llama architecture plugin: parents, DeciLM children, block variants."""

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


def _family(_options: NoOptions) -> ModelFamily:
    from puzzle_plugins.llama.family import LlamaFamily

    return LlamaFamily()


@hookimpl
def puzzle_architectures() -> list[ArchitecturePlugin]:
    return [
        ArchitecturePlugin(
            name="llama",
            implementation=_family,
            description="LlamaForCausalLM and look-alikes; children are DeciLM (nemotron-nas) models",
        )
    ]


@hookimpl
def puzzle_block_variants() -> list[BlockVariantsPlugin]:
    return [
        BlockVariantsPlugin(
            name="llama",
            implementation=DecoderVariants,
            options=DecoderVariantOptions,
            description="GQA with fewer KV heads, narrower SwiGLU, linear and no-op sub-blocks",
        )
    ]
