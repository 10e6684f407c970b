"""The Llama family: LlamaForCausalLM and look-alikes (RMSNorm, SwiGLU, RoPE, GQA).

:class:`LlamaLikeFamily` holds everything that only depends on the module layout
(``model.embed_tokens``, ``model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head``).
A look-alike family (Mistral, Qwen2) subclasses it and sets ``name``, ``model_types``
and, if its config has other field names, overrides :meth:`parent_shape_fields`.
Children of every such family are DeciLM models (``modeling_decilm.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from puzzle_core.api import (
    AttentionSpec,
    BlockSpec,
    Calibration,
    FFNSpec,
    LoadedModel,
    ModelFamily,
    ModelShape,
    Part,
    SubBlockSpec,
    UserError,
    read_config,
    torch_dtype,
)
from puzzle_plugins.llama import blockconfig
from puzzle_plugins.llama.configuration_decilm import DeciLMConfig
from puzzle_plugins.llama.init import InitMethods, init_sublayer
from puzzle_plugins.llama.modeling_decilm import DeciLMForCausalLM
from puzzle_plugins.llama.runner import LlamaLayerRunner, layer_sublayer

DECILM_MODEL_TYPES = ("nemotron-nas", "deci")


def register_with_transformers() -> None:
    """Let ``Auto*`` classes open DeciLM folders with our code (no remote code needed in this process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM, exist_ok=True)


register_with_transformers()

# Llama config fields a DeciLM child inherits from its parent (the per-block ones are left out).
_INHERITED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_bias",
    "attention_dropout", "mlp_bias",
)




def uninitialised_child(config: DeciLMConfig, dtype: torch.dtype) -> DeciLMForCausalLM:
    """A DeciLM model whose weights are about to be loaded: random initialisation skipped (it dominates build time)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = DeciLMForCausalLM(config)
    model.tie_weights()
    return model.to(dtype)


class LlamaLikeFamily(ModelFamily):
    """A family whose models have the Llama module layout; children are DeciLM models."""

    name = "llama"
    default_variants = "llama"
    model_types: tuple[str, ...] = ("llama",)

    # ------------------------------------------------------------------ configs and shapes

    def detect(self, hf_config: Mapping[str, Any]) -> bool:
        model_type = hf_config.get("model_type")
        return model_type in self.model_types or (model_type in DECILM_MODEL_TYPES and "block_configs" in hf_config)

    def parent_shape_fields(self, hf_config: Mapping[str, Any]) -> dict:
        """The :class:`ModelShape` fields of a uniform (parent) config."""
        heads = hf_config["num_attention_heads"]
        hidden = hf_config["hidden_size"]
        return {
            "num_layers": hf_config["num_hidden_layers"],
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": hf_config.get("num_key_value_heads") or heads,
            "head_dim": hf_config.get("head_dim") or hidden // heads,
            "intermediate_size": hf_config["intermediate_size"],
            "vocab_size": hf_config["vocab_size"],
            "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        }

    def shape(self, hf_config: Mapping[str, Any]) -> ModelShape:
        """Shape from ``config.json`` alone: a Llama config, or a DeciLM one with ``block_configs``.

        For a DeciLM config the reference KV heads / FFN size are the largest any block has.
        """
        try:
            if hf_config.get("block_configs"):
                hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
                blocks = blockconfig.block_specs(hf_config["block_configs"], hidden)
                attention_groups = [b.attention.n_heads_in_group for b in blocks if b.attention.kind == "attention"]
                ffn_sizes = [b.ffn.intermediate_size for b in blocks if b.ffn.kind == "ffn"]
                fields = {
                    **self.parent_shape_fields({**hf_config, "intermediate_size": max(ffn_sizes, default=0),
                                                "num_key_value_heads": heads // min(attention_groups, default=heads)}),
                }
                if len(blocks) != fields["num_layers"]:
                    raise UserError(
                        f"The config has {len(blocks)} block_configs for {fields['num_layers']} layers; "
                        f"they must match."
                    )
            else:
                fields = self.parent_shape_fields(hf_config)
                block = BlockSpec(
                    AttentionSpec(n_heads_in_group=fields["num_attention_heads"] // fields["num_key_value_heads"]),
                    FFNSpec(intermediate_size=fields["intermediate_size"]),
                )
                blocks = [block] * fields["num_layers"]
        except KeyError as exc:
            raise UserError(f"The model config lacks the field {exc.args[0]!r} that a {self.name} model needs.") from None
        return ModelShape(family=self.name, blocks=tuple(blocks), **fields)

    def child_config(self, parent_config, blocks: Sequence[BlockSpec]) -> DeciLMConfig:
        """The DeciLM config of a child of ``parent_config`` (a transformers config) with ``blocks``."""
        source = parent_config.to_dict()
        fields = {key: source[key] for key in _INHERITED_FIELDS if source.get(key) is not None}
        fields["num_hidden_layers"] = len(blocks)
        config = DeciLMConfig(
            **fields,
            block_configs=[blockconfig.block_config(b, source["hidden_size"]) for b in blocks],
            architectures=["DeciLMForCausalLM"],
        )
        config._attn_implementation = getattr(parent_config, "_attn_implementation", None) or "sdpa"
        return config

    # ------------------------------------------------------------------ loading parents

    def aliases(self) -> Mapping[str, Callable[[], Path]]:
        from puzzle_plugins.llama.aliases import ALIASES

        return ALIASES

    def load_parent(self, source: str, dtype: str = "fp32", trust_remote_code: bool = False) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            from puzzle_plugins.llama.gguf import load_gguf

            return self._loaded(*load_gguf(path, torch_dtype(dtype)), source=str(path))
        config = read_config(path)
        if config.get("model_type") in DECILM_MODEL_TYPES:
            return self.load_child(path, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)  # never unpickle a .bin
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return self._loaded(model, tokenizer, source=str(path))

    def load_parent_layers(self, source: str, layers: Sequence[int], dtype: str = "fp32",
                           trust_remote_code: bool = False, ends: bool = False) -> LoadedModel:
        path = Path(source).expanduser()
        if not path.is_dir():  # a GGUF file is dequantised whole
            return self.load_parent(source, dtype, trust_remote_code)
        from puzzle_plugins.llama.partial import load_parent_layers

        return load_parent_layers(self, path, layers, torch_dtype(dtype), trust_remote_code, ends)

    def _loaded(self, model: nn.Module, tokenizer, source: str) -> LoadedModel:
        model.eval()
        return LoadedModel(model=model, tokenizer=tokenizer, shape=self.shape(model.config.to_dict()), source=source)

    # ------------------------------------------------------------------ building children

    def init_sublayer(self, parent: LoadedModel, layer: int, spec: SubBlockSpec, calibration: Calibration | None,
                      method: str = "default") -> nn.Module:
        config = self.child_config(parent.model.config, parent.shape.blocks)
        return self._init_sublayer(parent, layer, spec, config, calibration, InitMethods.parse(method))

    def _init_sublayer(self, parent: LoadedModel, layer: int, spec: SubBlockSpec, config: DeciLMConfig,
                       calibration: Calibration | None, methods: InitMethods) -> nn.Module:
        block = parent.shape.blocks[layer]
        source = block.attention if isinstance(spec, AttentionSpec) else block.ffn
        if spec.kind != "no_op" and (source.kind == "no_op" or (source.kind == "linear" and spec.kind != "linear")):
            raise UserError(
                f"Variant {spec.id} of layer {layer} cannot be initialised from the parent's {source.id}: it has no "
                f"weights of that kind. Compress the original parent instead of a child."
            )
        return init_sublayer(parent.model.model.layers[layer], spec, config, calibration, methods)

    def build_child(self, parent: LoadedModel, blocks: Sequence[BlockSpec],
                    sublayers: Mapping[tuple[int, Part], Mapping[str, Any]] | None = None) -> LoadedModel:
        """A DeciLM child; each sub-block from ``sublayers``, else the parent's own, else initialised from it."""
        blocks = list(blocks)
        if len(blocks) != parent.shape.num_layers:
            raise UserError(f"The child needs one block per parent layer: got {len(blocks)} for {parent.shape.num_layers}.")
        sublayers = dict(sublayers or {})
        parent_model = parent.model
        config = self.child_config(parent_model.config, blocks)
        child = uninitialised_child(config, next(parent_model.parameters()).dtype)
        parent_state = parent_model.state_dict()
        state = {key: parent_state[key] for key in ("model.embed_tokens.weight", "model.norm.weight")}
        state["lm_head.weight"] = parent_state.get("lm_head.weight", parent_state["model.embed_tokens.weight"])
        for index, block in enumerate(blocks):
            parent_block = parent.shape.blocks[index]
            for part, spec, parent_spec in (("attention", block.attention, parent_block.attention),
                                            ("ffn", block.ffn, parent_block.ffn)):
                if (index, part) in sublayers:
                    weights = sublayers[(index, part)]
                elif spec == parent_spec:
                    weights = layer_sublayer(parent_model.model.layers[index], part).state_dict()
                else:
                    weights = self._init_sublayer(parent, index, spec, config, None, InitMethods()).state_dict()
                expected = layer_sublayer(child.model.layers[index], part).state_dict()
                _check_sublayer(index, part, spec, weights, expected)
                state.update({f"model.layers.{index}.{key}": value for key, value in weights.items()})
        child.load_state_dict(state, strict=True)
        child.eval()
        return LoadedModel(child, parent.tokenizer, parent.shape.with_blocks(blocks), source=f"child of {parent.source}")

    def random_model(self, shape: ModelShape, dtype: str = "fp32") -> nn.Module:
        """A random model of ``shape``: a plain Llama when every block is the parent's, else DeciLM."""
        from transformers import LlamaConfig, LlamaForCausalLM

        parent_config = LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads,
            head_dim=shape.head_dim,
            tie_word_embeddings=shape.tie_word_embeddings,
            max_position_embeddings=max(2048, shape.num_layers),
        )
        uniform = self.shape(parent_config.to_dict()).blocks
        if tuple(shape.blocks) == uniform:
            model = LlamaForCausalLM(parent_config)
        else:
            model = DeciLMForCausalLM(self.child_config(parent_config, shape.blocks))
        return model.to(torch_dtype(dtype)).eval()

    def layer_runner(self, model: nn.Module) -> LlamaLayerRunner:
        return LlamaLayerRunner(model)

    # ------------------------------------------------------------------ checkpoints

    def export(self, child: LoadedModel, out_dir: Path) -> None:
        from puzzle_plugins.llama.export import export_child

        export_child(self, child, Path(out_dir))

    def load_child(self, path: Path, dtype: str = "fp32") -> LoadedModel:
        from puzzle_plugins.llama.export import load_child

        return load_child(self, Path(path), torch_dtype(dtype))


def _check_sublayer(layer: int, part: str, spec: SubBlockSpec, weights: Mapping[str, Any], expected: Mapping[str, Any]):
    """Sub-block weights must have exactly the tensors (and shapes) the child's block has."""
    got = {k: tuple(v.shape) for k, v in weights.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got != want:
        raise UserError(
            f"The {part} weights given for layer {layer} do not fit variant {spec.id}: expected tensors {want}, "
            f"got {got}. Rebuild the block library for this parent, or pick the variant they were trained for."
        )


class LlamaFamily(LlamaLikeFamily):
    """LlamaForCausalLM (Llama 2/3, SmolLM2, TinyLlama...) and DeciLM children of them."""
