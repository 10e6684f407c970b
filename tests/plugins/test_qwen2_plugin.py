"""The Qwen2 example package (examples/puzzle-qwen2): a third-party family written against the API alone.

A tiny random Qwen2 is built in code from ``transformers.Qwen2Config`` (biases on q/k/v
set non-zero, so a child that dropped or moved them would show), saved with a byte-level
tokenizer, and taken through the conformance checks, exact parameter counts, ``puzzle
model info`` / ``check``, and the whole pipeline.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from puzzle_core.api import LoadedModel, parameter_count
from puzzle_core.api.testing import assert_family_conforms
from puzzle_core.blocks import BlockSpec
from puzzle_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "examples" / "puzzle-qwen2"
SOURCES = sorted((PACKAGE / "puzzle_qwen2").glob("*.py"))
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 4


def tiny_qwen2(seed: int = 0):
    """``(model, tokenizer)``: a seeded 4-layer Qwen2 (tied embeddings) whose q/k/v biases are not zero."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from puzzle_plugins.llama.aliases import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    return model, tokenizer


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    model, tokenizer = tiny_qwen2()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def family(registries):
    return registries.architectures.get("qwen2").create()


@pytest.fixture
def parent(family):
    model, tokenizer = tiny_qwen2()
    return LoadedModel(model, tokenizer, family.shape(model.config.to_dict()), source="tiny qwen2")


# ---------------------------------------------------------------- the package


def test_the_package_is_installed_and_registers_its_family_and_variants(registries):
    distribution = importlib.metadata.distribution("puzzle-qwen2")
    (entry_point,) = distribution.entry_points.select(group="puzzle")
    assert (entry_point.name, entry_point.value) == ("qwen2", "puzzle_qwen2")
    assert registries.architectures.entry("qwen2").distribution == "puzzle-qwen2"
    assert registries.block_variants.entry("qwen2").distribution == "puzzle-qwen2"


def test_registering_it_imports_no_transformers():
    """``puzzle`` commands import every plugin: the family, and transformers with it, wait for a run to build it."""
    code = ("import sys, puzzle_qwen2; puzzle_qwen2.puzzle_architectures(); puzzle_qwen2.puzzle_block_variants(); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers', 'puzzle_qwen2.'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_it_uses_only_public_names_of_the_api_and_copies_no_core_code():
    from puzzle_core import api
    from puzzle_core.api import decoder

    public = {"puzzle_core.api": set(api.__all__), "puzzle_core.api.decoder": set(decoder.__all__)}
    core_lines = set()
    for path in [*(ROOT / "puzzle_core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        core_lines |= {line.strip() for line in path.read_text().splitlines() if len(line.strip()) > 30}
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("puzzle"):
                if node.module.startswith("puzzle_qwen2"):
                    continue
                assert node.module in public, f"{path.name} imports {node.module}"
                assert {a.name for a in node.names} <= public[node.module], path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("puzzle") for a in node.names), path.name
            if isinstance(node, ast.Attribute):
                assert not node.attr.startswith("_"), f"{path.name} uses the private name {node.attr}"
        copied = [line for line in path.read_text().splitlines() if line.strip() in core_lines]
        assert len(copied) <= 3, f"{path.name} repeats lines of puzzle's own code: {copied}"


def test_it_is_small_and_its_readme_says_how_small():
    lines = {f"puzzle_qwen2/{path.name}": len(path.read_text().splitlines()) for path in SOURCES}
    assert sum(lines.values()) < 200, lines
    stated = dict(re.findall(r"^\| `(puzzle_qwen2/\w+\.py)` \| (\d+) \|", (PACKAGE / "README.md").read_text(), re.M))
    assert {name: int(count) for name, count in stated.items()} == lines


# ---------------------------------------------------------------- faithful children


def test_it_conforms_all_parent_child_equal_after_reload_without_puzzle(family, parent, tmp_path):
    report = assert_family_conforms(family, parent, tmp_path)
    all_parent = report.children[0]
    assert all_parent.name == "all-parent" and all_parent.cells["no puzzle"].passed
    exported = json.loads((tmp_path / "all-parent" / "config.json").read_text())
    assert (exported["model_type"], exported["puzzle_architecture"]) == ("qwen2-nas", "qwen2")
    assert exported["architectures"] == ["Qwen2NASForCausalLM"]
    assert "attention_bias" not in exported and exported["use_sliding_window"] is False  # Qwen2's own fields


def attention_parameters(kv_heads: int) -> int:
    """A Qwen2 attention, from its definition: q/k/v projections with biases, o_proj without."""
    head_dim = HIDDEN // HEADS
    return (HIDDEN + 1) * (HEADS + 2 * kv_heads) * head_dim + HEADS * head_dim * HIDDEN


def ffn_parameters(width: int) -> int:
    return 3 * HIDDEN * width  # gate, up, down; no biases


def test_parameter_counts_are_exact(family, parent, tmp_path):
    embeddings = parent.shape.vocab_size * HIDDEN + HIDDEN  # tied with the LM head; the final norm
    norm = HIDDEN
    assert parameter_count(parent.model) == embeddings + LAYERS * (attention_parameters(KV_HEADS) + ffn_parameters(FFN)
                                                                   + 2 * norm)
    ids = ["attn_g4+ffn_64", "attn_noop+ffn_128", "attn_g2+ffn_noop", "attn_linear+ffn_linear"]
    child = family.build_child(parent, [BlockSpec.parse(b) for b in ids])
    expected = (embeddings
                + attention_parameters(1) + ffn_parameters(64) + 2 * norm
                + ffn_parameters(FFN) + norm                    # a no-op attention has no norm either
                + attention_parameters(KV_HEADS) + norm
                + 2 * (HIDDEN * HIDDEN + norm))                 # linear maps keep their norms, have no biases
    assert parameter_count(child.model) == expected
    family.export(child, tmp_path / "child")
    tensors = load_file(str(tmp_path / "child" / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.k_proj.bias"].shape == (16,)
    assert not any(name.endswith("o_proj.bias") for name in tensors)
    assert sum(t.numel() for t in tensors.values()) == expected


def test_mixed_children_generate(family, parent):
    child = family.build_child(parent, [BlockSpec.parse(b) for b in
                                        ["attn_noop+ffn_64", "attn_linear+ffn_linear", "attn_g4+ffn_noop", "attn_g2+ffn_32"]])
    prompt = torch.tensor([[10, 11, 12, 13, 14]])
    generated = child.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=3)
    assert generated.shape == (1, 11)
    with torch.no_grad():
        full = child.model(generated).logits
    assert torch.equal(full[0, 4:-1].argmax(-1), generated[0, 5:])


def test_fewer_kv_heads_average_the_grouped_biases_too(family, parent):
    from puzzle_core.blocks import AttentionSpec

    module = family.init_sublayer(parent, 1, AttentionSpec(n_heads_in_group=4), None)
    source = parent.model.model.layers[1].self_attn
    torch.testing.assert_close(module.self_attn.k_proj.bias, source.k_proj.bias.reshape(2, 16).mean(0))
    torch.testing.assert_close(module.self_attn.q_proj.bias, source.q_proj.bias)
    assert module.self_attn.o_proj.bias is None


def test_the_default_init_fits_biased_heads_and_channels_better_than_averaging(family, parent):
    """The defaults (fitted_kv, fitted) fit the merged K/V heads with their biases, and the kept channels' down
    projection, to calibration tokens: on held-out tokens they beat averaged heads and kept columns."""
    from puzzle_core.api import Calibration
    from puzzle_core.blocks import AttentionSpec, FFNSpec

    runner = family.layer_runner(parent.model)

    def tokens(seed, part):
        ids = torch.randint(4, 200, (2, 48), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            hidden = runner.embed(ids)
            context = runner.context(hidden)
            hidden = runner.layer(0, hidden, context)
            if part == "ffn":
                hidden = hidden + runner.sublayer(1, "attention")(hidden, context)
            delta = runner.sublayer(1, part)(hidden, context)
        return Calibration(inputs=hidden.reshape(-1, HIDDEN), outputs=delta.reshape(-1, HIDDEN)), hidden, context, delta

    for part, spec, baseline in (("attention", AttentionSpec(n_heads_in_group=4), "attention=mean_kv"),
                                 ("ffn", FFNSpec(intermediate_size=64), "ffn=contribution")):
        calibration, *_ = tokens(0, part)
        _, hidden, context, delta = tokens(1, part)
        errors = []
        for method in ("default", baseline):
            module = family.init_sublayer(parent, 1, spec, calibration, method)
            with torch.no_grad():
                errors.append(float(((module(hidden, context) - delta) ** 2).sum() / (delta**2).sum()))
        assert errors[0] < errors[1], (part, errors)


def test_sliding_window_models_are_refused(family):
    from transformers import Qwen2Config

    from puzzle_core.errors import UserError

    config = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64).to_dict()
    with pytest.raises(UserError, match="sliding-window"):
        family.shape(config)


# ---------------------------------------------------------------- commands and the pipeline


def test_model_info_and_check_name_the_family_for_parents_and_children(qwen2_folder, tmp_path, capsys):
    assert main(["model", "info", str(qwen2_folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2" and info["layers"][0]["attention"][:2] == ["attn_g2", "attn_g4"]
    (tmp_path / "blocks.json").write_text(json.dumps(["attn_g4+ffn_64", "attn_noop+ffn_128", "attn_g2+ffn_noop",
                                                      "attn_g2+ffn_128"]))
    assert main(["model", "assemble", str(qwen2_folder), "--blocks", str(tmp_path / "blocks.json"),
                 "--out", str(tmp_path / "child")]) == 0
    capsys.readouterr()
    assert main(["model", "info", str(tmp_path / "child")]) == 0
    assert ": qwen2 model from" in capsys.readouterr().out
    assert main(["model", "check", str(qwen2_folder), "--keep", str(tmp_path / "check")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^no-op attention\s+attn_noop\+ffn_128(\s+ok){6}$", out, re.M) and "all passed" in out


def test_the_whole_pipeline_runs_on_a_tiny_qwen2(qwen2_folder, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["parent"] = {"source": str(qwen2_folder)}
    config["library"].update({"tokens": 256, "heldout_tokens": 128, "calibration_tokens": 128, "shard_tokens": 256})
    config["scoring"]["tokens"] = 128
    config["search"]["baselines"] = ["greedy"]
    config["gkd"].update({"tokens": 256, "checkpoint_every": 2, "validation_tokens": 128})
    config["evaluation"] = {"evaluators": [{"name": "kl_to_parent", "tokens": 128, "seq_len": 32},
                                           {"name": "throughput", "warmup": 0, "repeats": 1}]}
    (tmp_path / "qwen2.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "puzzle_core.cli", "run", str(tmp_path / "qwen2.yaml"),
                             "--run-dir", str(run)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("library", "score", "cost", "search", "assemble", "gkd", "evaluate", "report"):
        assert f"] {stage}:" in result.stdout
    children = json.loads((run / "children" / "index.json").read_text())["children"]
    assert children and all(json.loads((run / c["path"] / "config.json").read_text())["model_type"] == "qwen2-nas"
                            for c in children)
    final = next(run.glob("gkd/*/final"))
    assert json.loads((final / "config.json").read_text())["puzzle_architecture"] == "qwen2"
    evaluated = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert "parent" in evaluated and len(evaluated) > 1


def test_a_child_code_without_the_bias_override_fails_the_checks_with_the_reason(parent, tmp_path):
    """What CONTRIBUTING's step 3 says happens when modeling_qwen2_nas.py leaves make_attention out."""
    from puzzle_core.api.decoder import ChildCode
    from puzzle_core.api.testing import check_family
    from puzzle_qwen2.family import Qwen2Family

    source = (PACKAGE / "puzzle_qwen2" / "modeling_qwen2_nas.py").read_text()
    override = source[source.index("    @classmethod"):source.index("class Qwen2NASForCausalLM")]
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "modeling_qwen2_nas.py").write_text(source.replace(override, "\n\n"))
    (tmp_path / "code" / "configuration_qwen2_nas.py").write_text(
        (PACKAGE / "puzzle_qwen2" / "configuration_qwen2_nas.py").read_text())

    class WithoutBiases(Qwen2Family):
        code = ChildCode(tmp_path / "code", "configuration_qwen2_nas.Qwen2NASConfig",
                         "modeling_qwen2_nas.Qwen2NASForCausalLM")

    report = check_family(WithoutBiases(), parent, tmp_path / "check", isolated=False)
    assert all(child.cells["build"].passed is False for child in report.children)
    assert ("all-parent / build: ValueError: the child's attention in layer 0 (attn_g2) lacks the parent's "
            "self_attn.k_proj.bias, self_attn.q_proj.bias, self_attn.v_proj.bias; the child code must build the "
            "parent's modules (biases, norms)") in report.failures()
