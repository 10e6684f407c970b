"""A :class:`~puzzle_core.interfaces.ModelFamily` for decoder-only transformers, built from the shared pieces.

The family owns its child: ``code`` (a :class:`~puzzle_core.decoder.code.ChildCode`)
names its configuration and model classes, which subclass the shared heterogeneous
decoder in the family's own files; those files are what an export writes next to the
weights, and what this process builds children with. Everything else (shapes from a
config, loading, initialising variants, building, exporting and reloading children,
running one sub-block at a time) works on the module names transformers' decoders share,
through methods a family overrides where its models differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec, SubBlockSpec
from puzzle_core.decoder import specs
from puzzle_core.decoder.checkpoint import differences, read_safetensors, summary, tensor_mismatches
from puzzle_core.decoder.child_code.block_configs import BlockConfig
from puzzle_core.decoder.code import ChildCode
from puzzle_core.decoder.init import init_sublayer
from puzzle_core.decoder.runner import AttentionSublayer, DecoderLayerRunner, FFNSublayer, layer_sublayer
from puzzle_core.decoder.variants import InitMethods
from puzzle_core.dtypes import torch_dtype
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Calibration, LoadedModel, ModelFamily, ModelShape, Part
from puzzle_core.parents import read_config
from puzzle_core.rundir import atomic_dir

ARCHITECTURE_KEY = "puzzle_architecture"
"""The ``config.json`` key naming the architecture (family) that exported a child, so it recognises its own."""

_PER_BLOCK_FIELDS = {"block_configs", "intermediate_size", "num_key_value_heads", "num_hidden_layers"}
_NOT_INHERITED = {"architectures", "auto_map", "transformers_version", ARCHITECTURE_KEY}


class DecoderFamily(ModelFamily):
    """A decoder-only family whose children are heterogeneous decoders from its own :class:`ChildCode`.

    A subclass sets ``name`` (its architecture record's name), ``model_types`` (of its
    parents' configs), ``code`` and ``child_model_types`` (the ``model_type`` of its child
    config class, and any published spelling it also reads), and overrides what differs:
    :meth:`shape_fields` for other config field names, :meth:`load_parent` for other
    sources, :meth:`child_config`, :meth:`init_sublayer`.

    A child is claimed by the family named in its ``config.json`` (:data:`ARCHITECTURE_KEY`,
    written on export); children without that key belong to ``unmarked_children``, a family
    name (the Llama family sets ``"llama"`` for published nemotron-nas models), so a subclass
    with a name of its own does not claim them.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    code: ChildCode
    child_model_types: tuple[str, ...] = ()
    unmarked_children: str | None = None

    # ------------------------------------------------------------------ configs and shapes

    def is_child_config(self, hf_config: Mapping[str, Any]) -> bool:
        """Whether ``hf_config`` is a child in this family's layout (``block_configs`` and a child model type)."""
        return hf_config.get("model_type") in self.child_model_types and bool(hf_config.get("block_configs"))

    def detect(self, hf_config: Mapping[str, Any]) -> bool:
        if self.is_child_config(hf_config):
            return hf_config.get(ARCHITECTURE_KEY, self.unmarked_children) == self.name
        return hf_config.get("model_type") in self.model_types

    def shape_fields(self, hf_config: Mapping[str, Any]) -> dict:
        """The :class:`ModelShape` fields of a uniform (parent) config; a ``KeyError`` names a missing field."""
        heads, hidden = hf_config["num_attention_heads"], hf_config["hidden_size"]
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
        """Shape from ``config.json`` alone: a parent's, or a child's with ``block_configs``.

        For a child the reference KV heads / FFN size are the largest any block has.
        """
        try:
            if hf_config.get("block_configs"):
                hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
                blocks = specs.block_specs(hf_config["block_configs"], hidden)
                groups = [b.attention.n_heads_in_group for b in blocks if b.attention.kind == "attention"]
                sizes = [b.ffn.intermediate_size for b in blocks if b.ffn.kind == "ffn"]
                fields = self.shape_fields({**hf_config, "intermediate_size": max(sizes, default=0),
                                            "num_key_value_heads": heads // min(groups, default=heads)})
                if len(blocks) != fields["num_layers"]:
                    raise UserError(f"The config has {len(blocks)} block_configs for {fields['num_layers']} layers; "
                                    f"they must match.")
            else:
                fields = self.shape_fields(hf_config)
                block = BlockSpec(
                    AttentionSpec(n_heads_in_group=fields["num_attention_heads"] // fields["num_key_value_heads"]),
                    FFNSpec(intermediate_size=fields["intermediate_size"]),
                )
                blocks = [block] * fields["num_layers"]
        except KeyError as exc:
            raise UserError(f"The model config lacks the field {exc.args[0]!r} that a {self.name} model needs.") from None
        return ModelShape(family=self.name, blocks=tuple(blocks), **fields)

    def child_config(self, parent_config, blocks: Sequence[BlockSpec]):
        """The config of a child of ``parent_config`` (a transformers config) with ``blocks``.

        It inherits every parent field its config class declares, except the per-block ones.
        """
        config_class = self.code.config_class
        source = parent_config.to_dict()
        names = {f.name for f in dataclasses.fields(config_class)} - _PER_BLOCK_FIELDS - _NOT_INHERITED
        fields = {key: source[key] for key in names if source.get(key) is not None}
        config = config_class(
            **fields,
            num_hidden_layers=len(blocks),
            block_configs=[specs.block_config(b, source["hidden_size"]) for b in blocks],
            architectures=[self.code.model.split(".")[1]],
            **{ARCHITECTURE_KEY: self.name},
        )
        config._attn_implementation = getattr(parent_config, "_attn_implementation", None) or "sdpa"
        return config

    def shape_config(self, shape: ModelShape):
        """A child config of ``shape`` with the config class's defaults for everything else (random models)."""
        fields = {"vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
                  "num_attention_heads": shape.num_attention_heads, "tie_word_embeddings": shape.tie_word_embeddings,
                  "max_position_embeddings": max(2048, shape.num_layers)}
        if shape.head_dim != shape.hidden_size // shape.num_attention_heads:
            fields["head_dim"] = shape.head_dim
        config = self.code.config_class(
            **fields, num_hidden_layers=shape.num_layers,
            block_configs=[specs.block_config(b, shape.hidden_size) for b in shape.blocks],
            architectures=[self.code.model.split(".")[1]], **{ARCHITECTURE_KEY: self.name},
        )
        config._attn_implementation = "sdpa"
        return config

    # ------------------------------------------------------------------ parents

    def load_parent(self, source: str, dtype: str = "fp32", trust_remote_code: bool = False) -> LoadedModel:
        """A parent from a Hugging Face folder (safetensors only); a child folder is loaded as a child."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(source).expanduser()
        if self.is_child_config(read_config(path)):
            return self.load_child(path, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)  # never unpickle a .bin
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return self.loaded(model, tokenizer, source=str(path))

    def load_parent_layers(self, source: str, layers: Sequence[int], dtype: str = "fp32",
                           trust_remote_code: bool = False, ends: bool = False) -> LoadedModel:
        """The parent built on the meta device with real weights for ``layers`` only (see :mod:`.partial`).

        A GGUF file or a child folder is loaded whole.
        """
        from puzzle_core.decoder.partial import load_parent_layers

        path = Path(source).expanduser()
        if not path.is_dir() or self.is_child_config(read_config(path)):
            return self.load_parent(source, dtype, trust_remote_code)
        return load_parent_layers(self, path, layers, torch_dtype(dtype), trust_remote_code, ends)

    def loaded(self, model: nn.Module, tokenizer, source: str) -> LoadedModel:
        """``model`` in eval mode, with its shape read from its config."""
        model.eval()
        return LoadedModel(model=model, tokenizer=tokenizer, shape=self.shape(model.config.to_dict()), source=source)

    # ------------------------------------------------------------------ children

    def uninitialised_child(self, config, dtype: torch.dtype) -> nn.Module:
        """A child model whose weights are about to be loaded: random initialisation skipped (it dominates build time)."""
        from transformers.initialization import no_init_weights

        self.code.register_auto_classes()
        with no_init_weights():
            model = self.code.model_class(config)
        model.tie_weights()
        return model.to(dtype)

    def empty_sublayer(self, config, spec: SubBlockSpec) -> nn.Module:
        """The child's sub-block for ``spec``, built by the family's model class and not yet initialised."""
        other = FFNSpec(no_op=True) if isinstance(spec, AttentionSpec) else AttentionSpec(no_op=True)
        block = BlockSpec(spec, other) if isinstance(spec, AttentionSpec) else BlockSpec(other, spec)
        entry = BlockConfig.of(specs.block_config(block, config.hidden_size))
        layer = self.code.model_class.base_model_class.make_layer(config, entry, 0)
        if isinstance(spec, AttentionSpec):
            return AttentionSublayer(layer.input_layernorm, layer.self_attn)
        return FFNSublayer(layer.post_attention_layernorm, layer.mlp)

    def init_sublayer(self, parent: LoadedModel, layer: int, spec: SubBlockSpec, calibration: Calibration | None,
                      method: str = "default") -> nn.Module:
        """The sub-block of ``spec`` built by :meth:`empty_sublayer` and filled from the parent's by the shared
        initialisation (:func:`~puzzle_core.api.decoder.init_sublayer`); also what :meth:`build_child` uses."""
        methods = InitMethods.parse(method)
        block = parent.shape.blocks[layer]
        part: Part = "attention" if isinstance(spec, AttentionSpec) else "ffn"
        source = block.attention if part == "attention" else block.ffn
        if spec.kind != "no_op" and (source.kind == "no_op" or (source.kind == "linear" and spec.kind != "linear")):
            raise UserError(
                f"Variant {spec.id} of layer {layer} cannot be initialised from the parent's {source.id}: it has no "
                f"weights of that kind. Compress the original parent instead of a child."
            )
        parent_sublayer = layer_sublayer(parent.model.model.layers[layer], part)
        reference = next(parent.model.model.layers[layer].parameters())  # the layer's own: others may be on meta
        config = self.child_config(parent.model.config, parent.shape.blocks)
        child = self.empty_sublayer(config, spec).to(dtype=reference.dtype, device=reference.device)
        return init_sublayer(parent_sublayer, child, spec, calibration, methods)

    def build_child(self, parent: LoadedModel, blocks: Sequence[BlockSpec],
                    sublayers: Mapping[tuple[int, Part], Mapping[str, Any]] | None = None) -> LoadedModel:
        """A child; each sub-block from ``sublayers``, else the parent's own, else initialised from it."""
        blocks = list(blocks)
        if len(blocks) != parent.shape.num_layers:
            raise UserError(f"The child needs one block per parent layer: got {len(blocks)} for {parent.shape.num_layers}.")
        sublayers = dict(sublayers or {})
        parent_model = parent.model
        config = self.child_config(parent_model.config, blocks)
        child = self.uninitialised_child(config, next(parent_model.parameters()).dtype)
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
                    weights = self.init_sublayer(parent, index, spec, None).state_dict()
                expected = layer_sublayer(child.model.layers[index], part).state_dict()
                problems = tensor_mismatches(expected, weights)
                if problems and (index, part) in sublayers:
                    raise UserError(
                        f"The {part} weights given for layer {index} do not fit variant {spec.id}: {summary(problems)}. "
                        f"Rebuild the block library for this parent, or pick the variant they were trained for."
                    )
                if problems:
                    whose = "the parent's" if spec == parent_spec else "the initialised sub-block's"
                    raise ValueError(
                        f"the child's {part} in layer {index} ({spec.id}) {differences(expected, weights, whose)}; "
                        f"the child code must build the parent's modules (biases, norms)"
                    )
                state.update({f"model.layers.{index}.{key}": value for key, value in weights.items()})
        child.load_state_dict(state, strict=True)
        child.eval()
        return LoadedModel(child, parent.tokenizer, parent.shape.with_blocks(blocks), source=f"child of {parent.source}")

    def random_model(self, shape: ModelShape, dtype: str = "fp32") -> nn.Module:
        """A randomly initialised child of ``shape`` (the config class's defaults for the rest)."""
        self.code.register_auto_classes()
        return self.code.model_class(self.shape_config(shape)).to(torch_dtype(dtype)).eval()

    def layer_runner(self, model: nn.Module) -> DecoderLayerRunner:
        return DecoderLayerRunner(model)

    # ------------------------------------------------------------------ checkpoints

    def export(self, child: LoadedModel, out_dir: Path) -> None:
        """``config.json`` (``block_configs``, ``auto_map``, :data:`ARCHITECTURE_KEY`), safetensors weights, the
        tokenizer, and the code files verbatim, so plain transformers loads it with ``trust_remote_code=True``."""
        model = child.model
        if not isinstance(model, self.code.model_class):  # a parent-shaped model: the same tensors, a child config
            model = self.build_child(child, child.shape.blocks).model
        model.config.auto_map = self.code.auto_map()
        model.config.architectures = [self.code.model.split(".")[1]]
        setattr(model.config, ARCHITECTURE_KEY, self.name)
        with atomic_dir(Path(out_dir)) as tmp:
            model.save_pretrained(tmp)
            if child.tokenizer is not None:
                child.tokenizer.save_pretrained(tmp)
            self.code.write(tmp)

    def load_child(self, path: Path, dtype: str = "fp32") -> LoadedModel:
        """An exported (or published) child, loaded with this family's code; weights are checked against its config."""
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"Child checkpoint {folder} does not exist; pass a folder written by 'puzzle model assemble'.")
        raw = read_config(folder)
        if not self.is_child_config(raw):
            if self.detect(raw):
                return self.load_parent(str(folder), dtype=dtype)
            raise UserError(f"{folder} is not a {self.name} child (model_type {raw.get('model_type')!r}, "
                            f"no block_configs).")
        shape = self.shape(raw)  # validates block_configs
        config = self.code.config_class.from_pretrained(folder)
        model = self.uninitialised_child(config, torch.float32)
        weights = read_safetensors(folder)
        if config.tie_word_embeddings:
            weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
        problems = tensor_mismatches(model.state_dict(), weights)
        if problems:
            raise UserError(
                f"The block_configs in {folder / 'config.json'} disagree with the weights: {summary(problems)}. "
                f"The config and the safetensors files must come from the same export."
            )
        model.load_state_dict(weights, strict=True)
        model.to(torch_dtype(dtype)).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
        return LoadedModel(model=model, tokenizer=tokenizer, shape=shape, source=str(folder))
