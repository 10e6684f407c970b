"""The Llama architecture plugin: parents, DeciLM children, block variants."""

from __future__ import annotations

from puzzle_core.api import ArchitecturePlugin, BlockVariantsPlugin, ModelFamily, NoOptions, VariantProvider, hookimpl


def _family(_options: NoOptions) -> ModelFamily:
    from puzzle_plugins.llama.family import LlamaFamily

    return LlamaFamily()


def _variants(options) -> VariantProvider:
    from puzzle_plugins.llama.variants import LlamaVariants

    return LlamaVariants(options)


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
    from puzzle_plugins.llama.options import LlamaVariantOptions

    return [
        BlockVariantsPlugin(
            name="llama",
            implementation=_variants,
            options=LlamaVariantOptions,
            description="GQA with fewer KV heads, narrower SwiGLU, linear and no-op sub-blocks",
        )
    ]
