"""Replace-1-block scoring with the parent split over two gloo processes gives the single-process scores."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from puzzle_core.blocks import AttentionSpec, FFNSpec
from puzzle_core.scoring import ReplaceOneBlockEngine
from puzzle_core.scoring_pipeline import layer_ranges
from tests.core.test_scoring import SCORERS, batches, scorers, variant
from tests.tiny import tiny_parent

LAYERS = 5
# (layer, attention spec or None for the parent's, FFN spec or None): on both ranks' layers, and the parent's block
BLOCKS = [(0, AttentionSpec(n_heads_in_group=4), None), (1, None, FFNSpec(intermediate_size=64)),
          (2, None, None), (3, AttentionSpec(no_op=True), None), (4, None, FFNSpec(no_op=True))]


def block_modules(family, parent, runner, layer, attention, ffn):
    return (variant(family, parent, layer, attention) if attention else runner.sublayer(layer, "attention"),
            variant(family, parent, layer, ffn) if ffn else runner.sublayer(layer, "ffn"))


def _worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from puzzle_core.registry import get_registries
    from puzzle_core.scoring_pipeline import PipelineScoringEngine

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        registries = get_registries()
        family, parent = tiny_parent(num_layers=LAYERS)
        runner = family.layer_runner(parent.model)
        modules = {layer: block_modules(family, parent, runner, layer, a, f) for layer, a, f in BLOCKS}
        own = layer_ranges(LAYERS, 2)[rank]
        # what this rank must never touch goes to the meta device: the other rank's layers, and the ends it does not run
        base = parent.model.model
        for layer in range(LAYERS):
            if layer not in own:
                base.layers[layer].to("meta")
        for module in ([parent.model.lm_head, base.norm] if rank == 0 else [base.embed_tokens]):
            module.to("meta")
        engine = PipelineScoringEngine(runner, batches(), hidden_size=parent.shape.hidden_size, dtype=torch.float32,
                                       keep_log_probs=True, references=scorers(registries))
        results = []
        for layer, _, _ in BLOCKS:
            attention, ffn = modules[layer] if layer in own else (None, None)
            results.append(engine.score(layer, attention, ffn, scorers(registries)))
        if rank == 1:
            Path(out, "pipeline.json").write_text(json.dumps({"scores": results, "reference": engine.reference}))
        else:
            assert results[0] is None and engine.reference == {}
    finally:
        dist.destroy_process_group()


def test_layer_ranges():
    assert layer_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(ValueError):
        layer_ranges(2, 3)


@pytest.mark.slow  # two Python processes
def test_scores_with_the_parent_over_two_processes_equal_one_process(tmp_path, registries):
    import torch.multiprocessing as mp

    family, parent = tiny_parent(num_layers=LAYERS)
    runner = family.layer_runner(parent.model)
    engine = ReplaceOneBlockEngine(runner, batches(), keep_log_probs=True, vocab_size=parent.shape.vocab_size,
                                   max_cache_mib=64, references=scorers(registries), progress=False)
    single = [engine.score(layer, *block_modules(family, parent, runner, layer, a, f), scorers(registries),
                           reuse_prefix=False) for layer, a, f in BLOCKS]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    split = json.loads((tmp_path / "pipeline.json").read_text())
    for ours, theirs in zip(split["scores"], single):
        assert set(ours) == set(SCORERS)
        for name in SCORERS:  # the same kernels on the same numbers: float32 rounding only
            assert ours[name] == pytest.approx(theirs[name], abs=1e-5, rel=1e-5), name
    assert split["reference"] == pytest.approx(engine.reference, abs=1e-6)
    assert single[3]["kl"] > 1e-3  # the no-op attention is a real change, scored the same way


STAGE_CONFIG = {
    "parent": {"source": "tiny-random-llama"}, "seed": 0, "threads": 1, "data": {"corpus": "synthetic", "seq_len": 32},
    "library": {"tokens": 256, "heldout_tokens": 64, "calibration_tokens": 128, "batch_size": 4, "shard_tokens": 256,
                "variants": {"name": "llama", "ffn_fractions": [0.5]}},
    "scoring": {"tokens": 256, "batch_size": 4, "scorers": ["kl", "lm_loss"]},
}


@pytest.mark.slow  # a library, then two torchrun processes
def test_score_stage_with_the_parent_split_over_two_processes(tmp_path):
    from puzzle_core.config import structure
    from puzzle_core.pipeline import run_pipeline
    from puzzle_core.schema import PuzzleConfig

    local = tmp_path / "local"
    run_pipeline(structure(STAGE_CONFIG, PuzzleConfig), local, stages=["library", "score"], echo=lambda _: None)
    split_config = json.loads(json.dumps(STAGE_CONFIG))
    split_config["scoring"].update({"sharding": "layers", "executor": {"name": "torchrun", "nproc": 2, "threads": 1}})
    split = tmp_path / "split"
    ctx = run_pipeline(structure(split_config, PuzzleConfig), split, stages=["library", "score"], reuse=[local],
                       echo=lambda _: None)
    assert ctx.outcomes == {"library": "reused", "score": "ran"}
    assert "loaded_parent" not in ctx.__dict__  # the driver only merged what the two workers wrote
    ours = json.loads((split / "scores" / "scores.json").read_text())
    theirs = json.loads((local / "scores" / "scores.json").read_text())
    layers = [key for key in theirs if key.startswith("layer_")]
    assert layers and set(layers) == {key for key in ours if key.startswith("layer_")}
    for layer in layers:
        assert ours[layer].keys() == theirs[layer].keys() and len(theirs[layer]) > 3
        for block, scores in theirs[layer].items():
            for name, value in scores.items():
                assert ours[layer][block][name] == pytest.approx(value, abs=1e-5, rel=1e-5), (layer, block, name)
