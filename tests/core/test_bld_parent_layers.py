"""Once activations are captured, a BLD worker holds one parent layer at a time, never the whole parent."""

from __future__ import annotations

import shutil

import pytest
import torch
from puzzle_plugins.llama.family import LlamaFamily

from puzzle_core.config import structure
from puzzle_core.decoder.family import DecoderFamily
from puzzle_core.pipeline import RunContext, run_pipeline
from puzzle_core.rundir import RunDir, sha256_file
from puzzle_core.schema import ParentSection, PuzzleConfig
from tests.tiny import TINY_RUN

CONFIG = {
    **TINY_RUN,
    "library": {"tokens": 256, "heldout_tokens": 64, "calibration_tokens": 128, "batch_size": 4, "shard_tokens": 128,
                "variants": {"name": "llama", "ffn_fractions": [0.5]}},
}


def blocks(root) -> dict[str, str]:
    folder = root / "library" / "blocks"
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_bld_after_capture_never_loads_the_whole_parent(tmp_path, monkeypatch):
    from puzzle_core.stages import library

    config = structure(CONFIG, PuzzleConfig)
    root = tmp_path / "run"
    run_pipeline(config, root, stages=["library"], echo=lambda _: None)
    trained = blocks(root)
    assert len(trained) > 4
    shutil.rmtree(root / "library" / "blocks")  # activations kept: BLD has to run again, the capture not

    def whole_parent(*_args, **_kwargs):
        raise AssertionError("a BLD worker loaded the whole parent")

    loads = []
    partial = DecoderFamily.load_parent_layers

    def one_layer(self, source, layers, *args, **kwargs):
        loads.append(list(layers))
        loaded = partial(self, source, layers, *args, **kwargs)
        real = {i for i, layer in enumerate(loaded.model.model.layers) if next(layer.parameters()).device.type != "meta"}
        assert real == set(layers) and loaded.model.model.embed_tokens.weight.is_meta
        return loaded

    monkeypatch.setattr(LlamaFamily, "load_parent", whole_parent)
    monkeypatch.setattr(DecoderFamily, "load_parent_layers", one_layer)
    ctx = RunContext(config, RunDir(root))
    library.run(ctx)
    assert "loaded_parent" not in ctx.__dict__
    assert loads[0] == [] and sorted(loads[1:]) == [[0], [1], [2], [3]]  # the tokenizer, then each layer once
    assert blocks(root) == trained  # the same blocks, bit for bit, as with the whole parent


def test_a_parent_layer_equals_the_whole_parents(registries):
    from puzzle_core.blocks import AttentionSpec, FFNSpec
    from puzzle_core.parents import load_parent, load_parent_layers

    section = ParentSection(source="tiny-random-llama")
    family, whole = load_parent(section, registries)
    _, part = load_parent_layers(section, registries, [2])
    assert torch.equal(part.model.model.layers[2].mlp.down_proj.weight, whole.model.model.layers[2].mlp.down_proj.weight)
    assert part.model.model.layers[1].mlp.down_proj.weight.is_meta and part.tokenizer is not None
    hidden = torch.randn(2, 5, 64)
    ours, theirs = family.layer_runner(part.model), family.layer_runner(whole.model)
    with torch.no_grad():
        torch.testing.assert_close(ours.sublayer(2, "attention")(hidden, ours.context(hidden)),
                                   theirs.sublayer(2, "attention")(hidden, theirs.context(hidden)), rtol=0, atol=0)
    for spec in (AttentionSpec(n_heads_in_group=4), FFNSpec(intermediate_size=64)):
        a, b = (family.init_sublayer(p, 2, spec, None) for p in (part, whole))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(Exception):  # layers it does not hold cannot run
        ours.sublayer(1, "ffn")(hidden, None)
