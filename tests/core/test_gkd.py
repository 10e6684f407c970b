"""Global distillation on a tiny Llama: it lowers KL, resumes exactly, merges LoRA, stops on NaN."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from puzzle_core import gkd
from puzzle_core.blocks import BlockSpec
from puzzle_core.config import structure, unstructure
from puzzle_core.data import CorpusSplit, TokenizedCorpus
from puzzle_core.errors import ConfigError, UserError
from puzzle_core.gkd import DistillationObjective, DistillRun, GKDDiverged, Student, distill, latest_checkpoint
from puzzle_core.interfaces import DistillationLoss
from puzzle_core.schema import GKDSection
from tests.tiny import tiny_parent

SEQ_LEN = 16
CHILD_BLOCKS = ("attn_g2+ffn_128", "attn_g4+ffn_64", "attn_linear+ffn_128", "attn_g2+ffn_noop")


def make_setup():
    """A parent with peaked next-token distributions and a corpus of random tokens."""
    family, parent = tiny_parent(seed=0, num_layers=4)
    with torch.no_grad():
        parent.model.lm_head.weight.mul_(5.0)  # a random init is near-uniform; make KL informative
    vocab = parent.shape.vocab_size
    generator = torch.Generator().manual_seed(0)
    splits = {s: CorpusSplit((), torch.randint(4, vocab, (n,), generator=generator)) for s, n in
              (("train", 8192), ("validation", 512), ("test", 512))}
    return family, parent, TokenizedCorpus("random", splits)


@pytest.fixture
def setup():
    return make_setup()


def make_child(family, parent, blocks=CHILD_BLOCKS):
    """A heterogeneous child, its weights perturbed so that GKD has something to recover."""
    child = family.build_child(parent, [BlockSpec.parse(b) for b in blocks])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in child.model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return child


def section(**overrides) -> GKDSection:
    base = {"tokens": 2048, "batch_size": 4, "seq_len": SEQ_LEN, "lr": 2e-3, "warmup_fraction": 0.1,
            "checkpoint_every": 8, "validation_tokens": 256, "device": "cpu"}
    return structure({**base, **overrides}, GKDSection)


def train(family, parent, corpus, tmp_path, settings, child=None, registries=None):
    from puzzle_core.registry import get_registries

    child = child or make_child(family, parent)
    objective = DistillationObjective.from_config(settings, registries or get_registries())
    run = DistillRun(corpus=corpus, seq_len=SEQ_LEN, seed=0, checkpoint_dir=tmp_path / "ckpt", fingerprint="f")
    return distill(child, parent, family, objective, settings, run)


def test_gkd_lowers_validation_kl_of_a_perturbed_child(setup, tmp_path):
    family, parent, corpus = setup
    model, log, totals = train(family, parent, corpus, tmp_path, section())
    before, after = log.validation[0].kl, log.validation[-1].kl
    assert before > 0.05
    assert after < 0.5 * before
    assert totals["steps"] == 2048 // (4 * SEQ_LEN) and totals["tokens"] == 2048
    assert [p.step for p in log.validation] == [0, 8, 16, 24, 32]
    assert set(log.train[0].terms) == {"cosine", "kl"}
    # the curve is what the exported child gives: re-measure on the returned model
    forward = gkd.LayerwiseForward(model, family)
    teacher = gkd.LayerwiseForward(parent.model, family)
    batches = list(corpus.batches("validation", SEQ_LEN, 4, 256, 0))
    assert gkd.validation_kl(forward, teacher, batches, torch.device("cpu"), gkd.nullcontext) == pytest.approx(after)


def test_killed_run_resumes_to_identical_weights(setup, tmp_path, monkeypatch):
    family, parent, corpus = setup
    settings = section(tokens=1024, checkpoint_every=4, lr=1e-3)
    reference, reference_log, _ = train(family, parent, corpus, tmp_path / "a", settings)

    original = gkd.save_checkpoint

    def save_then_die(directory, step, *args, **kwargs):
        path = original(directory, step, *args, **kwargs)
        if step == 8:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(gkd, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(family, parent, corpus, tmp_path / "b", settings)
    assert latest_checkpoint(tmp_path / "b" / "ckpt").name == "step_0000008"
    torch.manual_seed(1234)  # whatever the process did in between, the checkpoint restores the RNG
    resumed, resumed_log, totals = train(family, parent, corpus, tmp_path / "b", settings)

    assert totals["steps"] == 16
    state, expected = resumed.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert unstructure(resumed_log) == unstructure(reference_log)


def test_lora_wraps_custom_blocks_and_merges_back_to_plain_linear(setup, tmp_path):
    from peft.tuners.lora import LoraLayer

    family, parent, corpus = setup
    settings = section(lora_rank=4, lr=5e-3)
    child = make_child(family, parent)
    linear_attention = child.model.model.layers[2].self_attn.linear_attn  # a DeciLM-only module
    trainee = Student(child.model, settings)
    assert isinstance(child.model.model.layers[2].self_attn.linear_attn, LoraLayer)
    trainable = [n for n, p in child.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainee.finish()  # undo for the real run below
    assert child.model.model.layers[2].self_attn.linear_attn is linear_attention

    before = {k: v.clone() for k, v in child.model.state_dict().items()}
    model, log, _ = train(family, parent, corpus, tmp_path, settings, child=child)
    assert log.validation[-1].kl < log.validation[0].kl
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert isinstance(model.model.layers[2].self_attn.linear_attn, nn.Linear)
    state = model.state_dict()
    assert state.keys() == before.keys()  # no adapter tensors left
    assert not torch.equal(state["model.layers.2.self_attn.linear_attn.weight"], before["model.layers.2.self_attn.linear_attn.weight"])
    assert torch.equal(state["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # LoRA leaves it alone


def test_trainable_changed_trains_only_changed_sub_blocks_and_neighbours(setup, tmp_path):
    """Child: layer 0 and the attention of layer 3 are the parent's; layers 1-2 and layer 3's FFN differ."""
    family, parent, corpus = setup
    child = make_child(family, parent)

    def trained(**options) -> set[str]:
        student = make_child(family, parent)
        Student(student.model, section(**options), gkd.trainable_sublayers(family, student, parent, section(**options)))
        return {name.split(".")[2] + "." + name.split(".")[3] if name.startswith("model.layers") else name
                for name, p in student.model.named_parameters() if p.requires_grad}

    layers = trained(trainable="layers")
    assert "model.embed_tokens.weight" not in layers and "lm_head.weight" not in layers
    assert "model.norm.weight" not in layers and {"0.self_attn", "0.mlp", "3.self_attn"} <= layers
    assert trained(trainable="changed", trainable_neighbors=0) == {
        "1.input_layernorm", "1.self_attn", "1.post_attention_layernorm", "1.mlp", "2.input_layernorm", "2.self_attn"
    }  # layer 3's FFN is a no-op: nothing to train there
    assert trained(trainable="changed") == trained(trainable="layers")  # one neighbour each side reaches all four
    with pytest.raises(UserError, match="nothing would train"):
        same = family.build_child(parent, [BlockSpec.parse("attn_g2+ffn_128")] * 4)
        gkd.trainable_sublayers(family, same, parent, section(trainable="changed"))

    before = {k: v.clone() for k, v in child.model.state_dict().items()}
    model, log, _ = train(family, parent, corpus, tmp_path, section(trainable="changed", trainable_neighbors=0),
                          child=child)
    assert log.validation[-1].kl < log.validation[0].kl
    state = model.state_dict()
    for name in before:
        changed = not torch.equal(state[name], before[name])
        assert changed == (name.startswith(("model.layers.1.", "model.layers.2.self_attn")) or
                           name == "model.layers.2.input_layernorm.weight"), name


class ExplodesAfter(DistillationLoss):
    """A logits loss that turns NaN after ``calls`` calls."""

    target = "logits"

    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, student, teacher, labels=None):
        self.calls -= 1
        value = (student.float() - teacher.float()).pow(2).mean()
        return value * float("nan") if self.calls < 0 else value


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    family, parent, corpus = setup
    settings = section(tokens=1024, checkpoint_every=4)
    objective = DistillationObjective([("mse_logits", 1.0, ExplodesAfter(calls=6))])
    run = DistillRun(corpus=corpus, seq_len=SEQ_LEN, seed=0, checkpoint_dir=tmp_path / "ckpt", fingerprint="f",
                     label="child mip")
    with pytest.raises(GKDDiverged) as error:
        distill(make_child(family, parent), parent, family, objective, settings, run)
    message = str(error.value)
    assert "child mip diverged at step 7" in message and "gkd.lr" in message and "step_0000004" in message
    kept = latest_checkpoint(tmp_path / "ckpt")
    assert kept.name == "step_0000004"
    assert json.loads((kept / "state.json").read_text())["step"] == 4


def test_gkd_loss_terms_from_yaml(registries):
    gkd_section = structure(
        {"losses": ["cosine", {"name": "kl", "weight": 0.5, "temperature": 2.0}, {"name": "lm_loss", "weight": 0}]},
        GKDSection,
    )
    terms = gkd_section.losses
    assert [(t.name, t.weight) for t in terms] == [("cosine", 1.0), ("kl", 0.5), ("lm_loss", 0.0)]
    assert terms[1].loss.options.temperature == 2.0
    assert unstructure(gkd_section)["losses"][1] == {"name": "kl", "temperature": 2.0, "weight": 0.5}
    assert structure(unstructure(gkd_section), GKDSection) == gkd_section
    objective = DistillationObjective.from_config(gkd_section, registries)
    assert [name for name, _, _ in objective.terms] == ["cosine", "kl"]  # zero weight: off
    assert [(t.name, t.weight) for t in GKDSection().losses] == [("cosine", 1.0), ("kl", 1.0)]

    with pytest.raises(ConfigError, match=r"\$\.losses\[0\].*weight"):
        structure({"losses": [{"name": "kl", "weight": -1}]}, GKDSection)
    with pytest.raises(ConfigError, match="Unknown distillation loss 'cosin'"):
        structure({"losses": ["cosin"]}, GKDSection)
    with pytest.raises(UserError, match="no term with a weight above 0"):
        DistillationObjective.from_config(structure({"losses": [{"name": "kl", "weight": 0}]}, GKDSection), registries)


@pytest.mark.parametrize("bad", [{"checkpoint_every": 0}, {"lr": 0}, {"warmup_fraction": 1.5}, {"device": "gpu"},
                                 {"lora_rank": -1}, {"children": "best"}])
def test_bad_gkd_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        structure(bad, GKDSection)


def test_token_budget_below_one_step_is_a_user_error(setup, tmp_path):
    family, parent, corpus = setup
    with pytest.raises(UserError, match="less than one optimizer step"):
        train(family, parent, corpus, tmp_path, section(tokens=32))


def join_group(rank: int, world_size: int, port: int) -> None:
    """Join the process group as a torchrun process would: torchrun's environment, one thread."""
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    gkd.join_process_group()


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One torchrun-like process: same data and child as the single-process run, half the batch."""
    from pathlib import Path

    join_group(rank, world_size, port)
    try:
        family, parent, corpus = make_setup()
        model, log, totals = train(family, parent, corpus, Path(out_dir), section(tokens=1024, batch_size=2))
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                      f"{out_dir}/ddp.safetensors")
            Path(out_dir, "ddp_log.json").write_text(json.dumps(unstructure(log)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # starts two Python processes
def test_ddp_over_two_processes_matches_one_process_with_the_whole_batch(setup, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    family, parent, corpus = setup
    single, single_log, _ = train(family, parent, corpus, tmp_path / "single", section(tokens=1024, batch_size=4))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    state = single.state_dict()
    assert ddp.keys() <= state.keys() and len(ddp) > 10
    for name, tensor in ddp.items():  # Adam magnifies summation-order noise where gradients are ~0
        torch.testing.assert_close(tensor, state[name], rtol=1e-3, atol=2e-4)
    ddp_log = json.loads((tmp_path / "ddp_log.json").read_text())
    assert [p["step"] for p in ddp_log["validation"]] == [p.step for p in single_log.validation]
    assert ddp_log["validation"][-1]["kl"] == pytest.approx(single_log.validation[-1].kl, rel=1e-4)


def test_validation_with_a_teacher_cache_runs_only_the_teachers_head_again(setup):
    family, parent, corpus = setup
    student = gkd.LayerwiseForward(make_child(family, parent).model, family)
    teacher = gkd.LayerwiseForward(parent.model, family)
    batches = list(corpus.batches("validation", SEQ_LEN, 4, 256, 0))
    cache: dict = {}
    calls = []
    hook = parent.model.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = gkd.validation_kl(student, teacher, batches, torch.device("cpu"), gkd.nullcontext)
        first = gkd.validation_kl(student, teacher, batches, torch.device("cpu"), gkd.nullcontext, cache)
        assert sorted(cache) == list(range(len(batches))) and len(calls) == 2 * len(batches)
        again = gkd.validation_kl(student, teacher, batches, torch.device("cpu"), gkd.nullcontext, cache)
    finally:
        hook.remove()
    assert first == plain == again and len(calls) == 2 * len(batches)  # the teacher's layers did not run again
