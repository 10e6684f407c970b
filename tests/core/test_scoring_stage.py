"""Stage ``score`` on a tiny library: every block scored, trained weights used, shards resumable."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle_core.blocks import BlockSpec
from puzzle_core.config import structure
from puzzle_core.pipeline import RunContext, run_pipeline
from puzzle_core.rundir import RunDir
from puzzle_core.schema import PuzzleConfig
from tests.tiny import TINY_RUN

TINY = {
    **TINY_RUN,
    "library": {
        "tokens": 256,
        "batch_size": 4,
        "shard_tokens": 256,
        "variants": {"name": "llama", "ffn_fractions": [0.5], "include_linear": False},
    },
    "scoring": {
        "tokens": 128,
        "batch_size": 2,
        "scorers": ["kl", "lm_loss", "cosine", {"name": "half_mmlu", "limit": 2}],
    },
}
SCORERS = ("kl", "lm_loss", "cosine", "half_mmlu")


def config() -> PuzzleConfig:
    return structure(json.loads(json.dumps(TINY)), PuzzleConfig)


def read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("scored")
    ctx = run_pipeline(config(), run_dir, stages=["library", "score"], echo=lambda _m: None)
    return run_dir, ctx


def test_every_block_of_the_library_gets_every_score(scored):
    run_dir, _ = scored
    index = read_json(run_dir / "library" / "index.json")
    scores = read_json(run_dir / "scores" / "scores.json")
    view = read_json(run_dir / "library" / "library.json")
    for i, layer in enumerate(index["layers"]):
        blocks = layer["blocks"]
        assert len(blocks) == 9 and set(scores[f"layer_{i}"]) == set(blocks)
        for block_id in blocks:
            assert set(scores[f"layer_{i}"][block_id]) == set(SCORERS)
            assert view[f"layer_{i}"][block_id]["metrics"] == scores[f"layer_{i}"][block_id]
        parent, noop = scores[f"layer_{i}"][blocks[0]], scores[f"layer_{i}"]["attn_noop+ffn_noop"]
        assert parent["kl"] < 1e-6 and parent["cosine"] < 1e-6
        assert noop["kl"] > parent["kl"] + 1e-6
    meta = scores["_meta"]["scorers"]
    assert meta["half_mmlu"]["higher_is_better"] is True
    assert len(meta["half_mmlu"]["split"]["score"]) == 28 and meta["half_mmlu"]["split"]["seed"] == 0
    assert scores["layer_0"][index["layers"][0]["blocks"][0]]["lm_loss"] == pytest.approx(meta["lm_loss"]["parent"], abs=1e-5)
    assert meta["kl"]["parent"] < 1e-6


def test_scores_use_the_trained_library_weights(scored):
    """A trained block's KL equals that of the full child built from the library, run end to end."""
    from puzzle_core.bld import load_sublayers
    from puzzle_core.scoring import validation_data

    run_dir, ctx = scored
    ctx = RunContext(config(), RunDir(run_dir))
    scores = read_json(run_dir / "scores" / "scores.json")
    layer, block_id = 1, "attn_g4+ffn_64"
    blocks = list(ctx.parent.shape.blocks)
    blocks[layer] = BlockSpec.parse(block_id)
    child = ctx.family.build_child(ctx.parent, blocks, load_sublayers(run_dir, blocks))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in validation_data(ctx).load():
            parent_lp = torch.log_softmax(ctx.parent.model(batch.input_ids).logits, -1)
            child_lp = torch.log_softmax(child.model(batch.input_ids).logits, -1)
            total += float((parent_lp.exp() * (parent_lp - child_lp)).sum())
            count += batch.input_ids.numel()
    assert scores[f"layer_{layer}"][block_id]["kl"] == pytest.approx(total / count, rel=1e-4, abs=1e-7)


def test_only_missing_or_stale_shards_are_rescored(scored, monkeypatch):
    from puzzle_core.scoring import ScoringSession

    run_dir, _ = scored
    shards = run_dir / "scores" / "shards"
    before = read_json(run_dir / "scores" / "scores.json")
    (shards / "layer_2.json").unlink()
    stale = read_json(shards / "layer_0.json")
    stale["key"] = "from another library"
    (shards / "layer_0.json").write_text(json.dumps(stale))
    untouched = {name: (shards / name).stat().st_mtime_ns for name in ("layer_1.json", "layer_3.json")}

    scored_layers = []
    original = ScoringSession.score
    monkeypatch.setattr(ScoringSession, "score",
                        lambda self, layer, a, f: scored_layers.append(layer) or original(self, layer, a, f))
    run_pipeline(config(), run_dir, stages=["score"], echo=lambda _m: None)  # manifest checksums changed: reruns

    assert sorted(set(scored_layers)) == [0, 2]
    assert {name: (shards / name).stat().st_mtime_ns for name in untouched} == untouched
    assert read_json(run_dir / "scores" / "scores.json") == before


def test_a_non_finite_score_names_the_block_instead_of_writing_it(scored, monkeypatch):
    from puzzle_core.errors import UserError
    from puzzle_core.scoring import ScoringSession

    run_dir, _ = scored
    (run_dir / "scores" / "shards" / "layer_3.json").unlink()
    monkeypatch.setattr(ScoringSession, "score", lambda self, layer, a, f: {name: float("nan") for name in SCORERS})
    with pytest.raises(UserError, match="layer_3 gave a non-finite"):
        run_pipeline(config(), run_dir, stages=["score"], echo=lambda _m: None)
    assert not (run_dir / "scores" / "shards" / "layer_3.json").exists()
