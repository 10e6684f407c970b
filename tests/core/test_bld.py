"""Blockwise local distillation on a tiny random Llama: plans, capture, training, storage, loading."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from puzzle_core.activations import ActivationStore, ActivationWarning, CaptureSettings
from puzzle_core.bld import BlockWarning, DivergedError, Unit, load_sublayers, plan_library, read_solution_subspace
from puzzle_core.blocks import BlockSpec
from puzzle_core.config import structure
from puzzle_core.errors import UserError
from puzzle_core.pipeline import RunContext, run_pipeline
from puzzle_core.rundir import RunDir, sha256_file
from puzzle_core.schema import PuzzleConfig
from tests.tiny import TINY_RUN, tiny_parent

TINY = {
    **TINY_RUN,
    "library": {
        "tokens": 512,
        "heldout_tokens": 256,
        "calibration_tokens": 256,
        "batch_size": 4,
        "shard_tokens": 256,
        "lr": 3e-4,
        # mean_kv: a crude start that 4 steps must improve (fitted_kv starts near its optimum already)
        "variants": {"name": "llama", "ffn_fractions": [0.5, 0.25], "attention_init": "mean_kv"},
    },
}


def config(**library) -> PuzzleConfig:
    data = json.loads(json.dumps(TINY))
    data["library"].update(library)
    return structure(data, PuzzleConfig)


def build(run_dir, **library) -> RunContext:
    return run_pipeline(config(**library), run_dir, stages=["library"], echo=lambda _m: None)


def block_hashes(run_dir) -> dict[str, str]:
    folder = run_dir / "library" / "blocks"
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def decoupled(tmp_path_factory):
    """One decoupled library, shared by the tests that only read it."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("decoupled")
    build(run_dir)
    return run_dir


# ---------------------------------------------------------------- plans


def spaces(registries, parent, **options):
    choice = structure({"name": "llama", **options}, type(config().library.variants))
    provider = registries.record(choice).create(choice.options)
    return [provider.variants(parent.shape, i) for i in range(parent.shape.num_layers)]


def test_decoupled_plan_trains_every_non_parent_non_noop_sub_block(registries):
    _, parent = tiny_parent()
    layers = spaces(registries, parent)
    plan = plan_library("decoupled", parent.shape, layers)
    attention, ffn = len(layers[0].attention), len(layers[0].ffn)  # 4 and 7: parent + variants + linear + no-op
    assert len(plan.units) == parent.shape.num_layers * ((attention - 2) + (ffn - 2))
    layer = plan.layers[0]
    assert layer.blocks[0] == parent.shape.blocks[0].id and len(layer.blocks) == attention * ffn
    expected = {"attn_g4", "attn_linear", "ffn_96", "ffn_64", "ffn_32", "ffn_16", "ffn_linear"}
    assert {u.name for u in layer.units} == expected
    assert all(u.attention is None or u.ffn is None for u in plan.units)


def test_coupled_plan_is_every_pair_of_the_subspace(registries, tmp_path):
    _, parent = tiny_parent()
    layers = spaces(registries, parent)
    full = plan_library("coupled", parent.shape, layers)
    attention, ffn = len(layers[0].attention), len(layers[0].ffn)
    assert len(full.layers[0].units) == attention * ffn - 4  # pairs of parent / no-op only are not trained
    subspace = [["attn_g4+ffn_64", "attn_g2+ffn_32"], ["attn_noop+ffn_linear"], ["ffn_16"], []]
    plan = plan_library("coupled", parent.shape, layers, subspace)
    counts = [len(layer.units) for layer in plan.layers]
    # |A| x |F| with the parent's sub-blocks added, minus pairs of parent / no-op sub-blocks
    assert counts == [2 * 3 - 1, 2 * 2 - 2, 1 * 2 - 1, 0]
    assert plan.layers[0].blocks[0] == "attn_g2+ffn_128"
    assert {u.name for u in plan.layers[1].units} == {"attn_g2+ffn_linear", "attn_noop+ffn_linear"}
    with pytest.raises(UserError, match="does not offer"):
        plan_library("coupled", parent.shape, layers, [["attn_g3"], [], [], []])

    solutions = tmp_path / "solutions"
    solutions.mkdir()
    chosen = [["attn_g4+ffn_64", "attn_g2+ffn_128", "attn_noop+ffn_32", "attn_g2+ffn_linear"],
              ["attn_g2+ffn_32", "attn_g2+ffn_128", "attn_g4+ffn_32", "attn_g2+ffn_128"]]
    for n, blocks in enumerate(chosen):
        (solutions / f"s{n}.json").write_text(json.dumps({"chosen": {f"layer_{i}": b for i, b in enumerate(blocks)}}))
    (solutions / "index.json").write_text(json.dumps({"solutions": [{"name": "s0", "file": "s0.json"},
                                                                    {"name": "s1", "file": "s1.json"}]}))
    subspace = read_solution_subspace(solutions / "index.json", 4)
    assert subspace[0] == ["attn_g4+ffn_64", "attn_g2+ffn_32"]
    plan = plan_library("coupled", parent.shape, layers, subspace)
    assert [len(layer.units) for layer in plan.layers] == [5, 0, 3 * 2 - 2, 1]


def test_subspace_needs_coupled_mode(tmp_path):
    with pytest.raises(UserError, match="coupled"):
        build(tmp_path, subspace=[["attn_g4"]] * 4)


# ---------------------------------------------------------------- capture


def test_capture_stores_each_layers_input_and_sub_block_outputs(decoupled):
    ctx = RunContext(config(), RunDir(decoupled))
    store = ActivationStore(ctx.run_dir, CaptureSettings.from_config(ctx.config), ctx.parent.shape.num_layers)
    shards = store.plan(ctx.corpus)
    assert [s.name for s in shards] == ["train_00000", "train_00001", "heldout_00000"]
    runner = ctx.family.layer_runner(ctx.parent.model)
    shard = shards[1]
    with torch.no_grad():
        hidden = runner.embed(shard.input_ids)
        context = runner.context(hidden)
        for layer in range(ctx.parent.shape.num_layers):
            stored = store.load(layer, shard)
            assert stored["hidden"].dtype == torch.bfloat16 and stored["hidden"].shape == hidden.shape
            attn = runner.sublayer(layer, "attention")(hidden, context)
            ffn = runner.sublayer(layer, "ffn")(hidden + attn, context)
            for name, exact in (("hidden", hidden), ("attn_out", attn), ("ffn_out", ffn)):
                torch.testing.assert_close(stored[name].float(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
            hidden = hidden + attn + ffn


def test_damaged_activation_shard_is_captured_again(decoupled):
    ctx = RunContext(config(), RunDir(decoupled))
    store = ActivationStore(ctx.run_dir, CaptureSettings.from_config(ctx.config), ctx.parent.shape.num_layers)
    shard = store.plan(ctx.corpus)[0]
    path = store.layer_file(2, shard)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.warns(ActivationWarning, match="train_00000"):
        assert not store.is_complete(shard)
    store.capture(ctx.family.layer_runner(ctx.parent.model), shard, 4, torch.device("cpu"))
    assert store.is_complete(shard) and path.read_bytes() == original


# ---------------------------------------------------------------- training and storage


def test_trained_blocks_beat_their_initialisation_on_held_out_activations(decoupled):
    index = json.loads((decoupled / "library" / "index.json").read_text())
    assert index["mode"] == "decoupled" and len(index["layers"]) == 4
    for layer in index["layers"]:
        assert layer["blocks"][0] == "attn_g2+ffn_128"
        assert set(layer["trained"]) == {"attn_g4", "attn_linear", "ffn_64", "ffn_32", "ffn_linear"}
        for name in ("attn_g4", "ffn_64", "ffn_32"):
            record = layer["trained"][name]
            assert record["heldout_loss_after"] < record["heldout_loss_before"], (name, record)
            assert record["tokens"] == 512 and record["steps"] == 4
            assert record["train_tokens_per_s"] > 0 and record["peak_memory_mib"] > 0
    library = json.loads((decoupled / "library" / "library.json").read_text())
    assert list(library) == ["layer_0", "layer_1", "layer_2", "layer_3"]
    assert list(library["layer_0"])[0] == "attn_g2+ffn_128" and len(library["layer_0"]) == 4 * 5


def test_load_sublayers_builds_a_working_child(decoupled):
    ctx = RunContext(config(), RunDir(decoupled))
    ids = ("attn_g4+ffn_64", "attn_g2+ffn_128", "attn_noop+ffn_linear", "attn_linear+ffn_32")
    blocks = [BlockSpec.parse(b) for b in ids]
    sublayers = load_sublayers(decoupled, blocks)
    assert set(sublayers) == {(0, "attention"), (0, "ffn"), (2, "ffn"), (3, "attention"), (3, "ffn")}
    stored = load_file(decoupled / "library" / "blocks" / "layer_000" / "ffn_64.safetensors")
    assert torch.equal(sublayers[(0, "ffn")]["mlp.up_proj.weight"], stored["ffn.mlp.up_proj.weight"])
    child = ctx.family.build_child(ctx.parent, blocks, sublayers)
    assert torch.equal(child.model.model.layers[0].mlp.up_proj.weight, stored["ffn.mlp.up_proj.weight"])
    with torch.no_grad():
        logits = child.model(torch.randint(4, 200, (1, 16))).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(UserError, match="not in the library"):
        load_sublayers(decoupled, ["attn_g2+ffn_100"] * 4)


def test_library_show_prints_every_layer(decoupled):
    from puzzle_core.cli import cli

    result = CliRunner().invoke(cli, ["library", "show", str(decoupled)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["layer", "variant", "status"]
    assert sum(1 for line in lines if line.split()[:1] == ["3"]) == 4 + 5  # attention + FFN variants of layer 3
    assert "20 trained sub-blocks" in result.output


def test_finished_library_is_skipped_and_damaged_block_is_retrained(decoupled):
    before = block_hashes(decoupled)
    damaged = decoupled / "library" / "blocks" / "layer_001" / "ffn_32.safetensors"
    untouched = decoupled / "library" / "blocks" / "layer_002" / "attn_g4.safetensors"
    mtime = untouched.stat().st_mtime_ns
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    with pytest.warns(BlockWarning, match="layer_1/ffn_32"):
        build(decoupled)
    assert block_hashes(decoupled) == before  # retrained to the very same bytes
    assert untouched.stat().st_mtime_ns == mtime  # finished jobs were not run again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(decoupled)  # nothing to do, nothing to warn about


def test_blocks_do_not_depend_on_which_units_share_a_pass(decoupled, tmp_path):
    """Passes of two units (the fixture: one pass of five per layer) give byte-identical blocks and losses."""
    build(tmp_path, units_per_pass=2)
    assert block_hashes(tmp_path) == block_hashes(decoupled)
    ours = json.loads((tmp_path / "library" / "index.json").read_text())["layers"]
    theirs = json.loads((decoupled / "library" / "index.json").read_text())["layers"]
    for layer, reference in zip(ours, theirs):
        for name, record in layer["trained"].items():
            assert record["loss_curve"] == reference["trained"][name]["loss_curve"]
            assert record["heldout_loss_after"] == reference["trained"][name]["heldout_loss_after"]


def test_bf16_autocast_trains_blocks_that_beat_their_initialisation(decoupled, tmp_path):
    build(tmp_path, bf16=True)
    index = json.loads((tmp_path / "library" / "index.json").read_text())
    for layer in index["layers"]:
        for name in ("attn_g4", "ffn_64", "ffn_32"):
            record = layer["trained"][name]
            assert record["heldout_loss_after"] < record["heldout_loss_before"], (name, record)
    assert not set(block_hashes(tmp_path).values()) & set(block_hashes(decoupled).values())  # it did change them


def test_coupled_library_trains_pairs_and_loads_both_parts(tmp_path):
    subspace = [["attn_g4+ffn_64"], ["attn_g2+ffn_128"], ["attn_linear+ffn_32"], ["attn_noop+ffn_linear"]]
    build(tmp_path, mode="coupled", subspace=subspace, tokens=256)
    index = json.loads((tmp_path / "library" / "index.json").read_text())
    assert [sorted(layer["trained"]) for layer in index["layers"]] == [
        ["attn_g2+ffn_64", "attn_g4+ffn_128", "attn_g4+ffn_64"],
        [],
        ["attn_g2+ffn_32", "attn_linear+ffn_128", "attn_linear+ffn_32"],
        ["attn_g2+ffn_linear", "attn_noop+ffn_linear"],
    ]
    record = index["layers"][0]["trained"]["attn_g4+ffn_64"]
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    chosen = ["attn_g4+ffn_64", "attn_g2+ffn_128", "attn_g2+ffn_32", "attn_noop+ffn_linear"]
    sublayers = load_sublayers(tmp_path, chosen)
    # a pair trains its parent sub-block too; a no-op has no weights
    assert set(sublayers) == {(0, "attention"), (0, "ffn"), (2, "attention"), (2, "ffn"), (3, "ffn")}


def test_diverging_job_stops_with_a_clear_error(tmp_path):
    with pytest.raises(DivergedError, match=r"diverged: its loss is (nan|inf)"):
        build(tmp_path, lr=1e12, warmup_fraction=0.0)


def test_logit_losses_are_refused(tmp_path):
    with pytest.raises(UserError, match="hidden-state loss"):
        build(tmp_path, loss="kl")


def test_unit_ids_are_stable():
    assert Unit(3, ffn="ffn_64").id == "layer_3/ffn_64"
    assert Unit(12, attention="attn_g4", ffn="ffn_linear").id == "layer_12/attn_g4+ffn_linear"
    assert os.path.basename(Unit(3, attention="attn_linear").name) == "attn_linear"


def test_a_job_captures_missing_activations_itself(decoupled, tmp_path):
    """Executors without a barrier between the capture and the BLD job lists stay correct."""
    import shutil

    from puzzle_core.bld import BLDTrainer, UnitPass
    from puzzle_core.interfaces import Job
    from puzzle_core.stages.library import library_parts

    run_dir = tmp_path / "run"
    shutil.copytree(decoupled / "activations", run_dir / "activations")
    ctx = RunContext(config(), RunDir(run_dir))
    store, settings, loss = library_parts(ctx)
    shard = store.shards[1]
    for layer in range(4):
        store.layer_file(layer, shard).unlink()
    runner = ctx.family.layer_runner(ctx.parent.model)
    captured = []

    def capture_missing():
        for missing in store.shards:
            if not store.is_complete(missing):
                captured.append(missing.name)
                store.capture(runner, missing, 4, torch.device("cpu"))

    with pytest.warns(ActivationWarning):
        cpu = torch.device("cpu")
        trainer = BLDTrainer(ctx.run_dir, ctx.family, ctx.parent, store, settings, loss, cpu, capture_missing)
        unit = Unit(2, ffn="ffn_64")
        trainer.run(Job(unit.id, 1.0, UnitPass(2, (unit,))))
    assert captured == ["train_00001"]
    expected = decoupled / "library" / "blocks" / "layer_002" / "ffn_64.safetensors"
    assert sha256_file(trainer.weights_path(unit)) == sha256_file(expected)


def test_schedule_warms_up_then_decays_and_curve_summary():
    from puzzle_core.bld import lr_factor, summarize_curve

    factors = [lr_factor(step, 10, 2) for step in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] > 0
    assert lr_factor(10, 10, 2) == pytest.approx(0.0)
    assert summarize_curve([1.0, 3.0, 5.0, 7.0], points=2) == [2.0, 6.0]
    assert summarize_curve([4.0], points=20) == [4.0] and summarize_curve([]) == []


def test_a_subspace_with_nothing_to_train_still_makes_a_library(tmp_path):
    build(tmp_path, mode="coupled", subspace=[["attn_noop+ffn_noop"]] * 4)
    index = json.loads((tmp_path / "library" / "index.json").read_text())
    assert [layer["blocks"] for layer in index["layers"]] == [
        ["attn_g2+ffn_128", "attn_g2+ffn_noop", "attn_noop+ffn_128", "attn_noop+ffn_noop"]
    ] * 4
    assert all(layer["trained"] == {} for layer in index["layers"])
    assert load_sublayers(tmp_path, ["attn_noop+ffn_noop"] * 4) == {}
