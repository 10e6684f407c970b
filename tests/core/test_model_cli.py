"""``puzzle model info|assemble`` and resolving parents (aliases, folders, GGUF files)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from puzzle_core.errors import UserError
from puzzle_core.schema import ParentSection

MIXED = {"layer_0": "attn_noop+ffn_64", "layer_1": "attn_linear+ffn_linear", "layer_2": "attn_g4+ffn_noop",
         "layer_3": "attn_g2+ffn_128"}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "puzzle-cache"  # shared by this file's tests: built once
    monkeypatch.setenv("PUZZLE_CACHE", str(folder))
    return folder


def invoke(*args):
    from puzzle_core.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_model_info_tiny_random_llama(cache):
    result = invoke("model", "info", "tiny-random-llama")
    assert result.exit_code == 0, result.output
    assert "4 layers, hidden 64, 4 heads / 2 KV heads" in result.output
    assert "layers 0-3 (now attn_g2+ffn_128)" in result.output
    assert "attention: attn_g2 attn_g4 attn_linear attn_noop" in result.output
    assert (cache / "models" / "tiny-random-llama-v3" / "config.json").is_file()
    data = json.loads(invoke("model", "info", "tiny-random-llama", "--json").stdout)
    assert data["num_layers"] == 4 and data["params"] == 181312
    assert data["layers"][0]["ffn"][:2] == ["ffn_128", "ffn_96"]


@pytest.mark.parametrize("form", ["solution", "mapping", "list"])
def test_assemble_from_a_solution_file(tmp_path, form):
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries

    blocks = {"solution": {"name": "mip_0", "chosen": MIXED}, "mapping": MIXED, "list": list(MIXED.values())}[form]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    result = invoke("model", "assemble", "tiny-random-llama", "--blocks", str(tmp_path / "blocks.json"),
                    "--out", str(tmp_path / "child"))
    assert result.exit_code == 0, result.output
    assert "initialised from the parent" in result.output
    family, child = load_parent(ParentSection(source=str(tmp_path / "child")), get_registries())
    assert [b.id for b in child.shape.blocks] == list(MIXED.values())
    with torch.no_grad():
        assert torch.isfinite(child.model(torch.tensor([[5, 6, 7]])).logits).all()
    info = invoke("model", "info", str(tmp_path / "child"))
    assert "layer 0 (now attn_noop+ffn_64)" in info.output


def test_assemble_rejects_bad_block_files(tmp_path):
    cases = {
        "short.json": (json.dumps({"layer_0": "attn_g2+ffn_128"}), "one block for each of the parent's 4 layers"),
        "bad_id.json": (json.dumps(["attn_g2+ffn_128"] * 3 + ["attn_q+ffn_8"]), "not an attention variant id"),
        "not_json.json": ("{", "not valid JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        result = invoke("model", "assemble", "tiny-random-llama", "--blocks", str(tmp_path / name),
                        "--out", str(tmp_path / "child"))
        assert result.exit_code == 2 and message in result.output, result.output
    result = invoke("model", "assemble", "tiny-random-llama", "--blocks", str(tmp_path / "short.json"),
                    "--out", str(tmp_path / "child"), "--library", str(tmp_path / "nowhere"))
    assert result.exit_code == 2


def test_parent_sources_and_their_errors(tmp_path, registries):
    from puzzle_core.parents import load_parent

    with pytest.raises(UserError, match="neither a known alias nor an existing path.*tiny-random-llama"):
        load_parent(ParentSection(source=str(tmp_path / "missing")), registries)
    with pytest.raises(UserError, match="no config.json"):
        load_parent(ParentSection(source=str(tmp_path)), registries)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="No installed architecture recognises.*'gpt2'.*llama"):
        load_parent(ParentSection(source=str(tmp_path / "gpt")), registries)
    family, parent = load_parent(ParentSection(source="tiny-random-llama", dtype="bfloat16"), registries)
    assert next(parent.model.parameters()).dtype == torch.bfloat16 and family.name == "llama"
    assert parent.tokenizer("hi").input_ids == [108, 109]  # bytes 'h', 'i' after the 4 special tokens


def test_parent_never_trusts_remote_code_unless_asked(monkeypatch, registries):
    from transformers import AutoModelForCausalLM

    from puzzle_core.config import structure
    from puzzle_core.parents import load_parent

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_parent(ParentSection(source="tiny-random-llama"), registries)
    load_parent(structure({"source": "tiny-random-llama", "trust_remote_code": True, "architecture": "llama"},
                          ParentSection), registries)
    assert seen == [False, True]


def test_gguf_of_an_unsupported_architecture_is_a_user_error(tmp_path, registries):
    import numpy as np
    from gguf import GGUFWriter

    from puzzle_core.parents import load_parent

    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="'mamba'"):
        load_parent(ParentSection(source=str(path)), registries)
    with pytest.raises(UserError, match="holds a 'mamba' model"):
        load_parent(structure_llama(str(path)), registries)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="could not be read as a"):
        load_parent(ParentSection(source=str(tmp_path / "junk.gguf")), registries)


def structure_llama(source: str) -> ParentSection:
    from puzzle_core.config import structure

    return structure({"source": source, "architecture": "llama"}, ParentSection)


def test_model_check_passes_on_tiny_random_llama(tmp_path):
    result = invoke("model", "check", "tiny-random-llama", "--keep", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["family"] == "llama" and report["distribution"] == "puzzle-nas"
    assert [c["name"] for c in report["children"]] == ["all-parent", "fewer KV heads", "narrower FFN", "linear attention",
                                                       "linear FFN", "no-op attention", "no-op FFN"]
    assert all(check["passed"] for c in report["children"] for check in c["checks"].values())
    assert "vLLM" in report["children"][3]["checks"]["export"]["detail"]  # the linear-map warning, as a note
