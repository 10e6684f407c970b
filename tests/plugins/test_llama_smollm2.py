"""Integration on the real SmolLM2-135M parent (slow: first use converts the GGUF to the cache)."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings

import pytest
import torch

from puzzle_core.blocks import BlockSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries
    from puzzle_core.schema import ParentSection

    return load_parent(ParentSection(source="smollm2-135m"), get_registries())


def test_smollm2_mixed_child_exports_and_generates_with_remote_code(smollm2, tmp_path):
    family, parent = smollm2
    assert parent.shape.num_layers == 30 and parent.shape.blocks[0].id == "attn_g3+ffn_1536"
    ids = parent.tokenizer("The capital of France is", return_tensors="pt").input_ids
    same = family.build_child(parent, parent.shape.blocks)
    with torch.no_grad():
        torch.testing.assert_close(same.model(ids).logits, parent.model(ids).logits, atol=1e-5, rtol=0)
    layers = ["attn_g3+ffn_1536"] * 30
    layers[3], layers[10], layers[20], layers[25], layers[29] = (
        "attn_g9+ffn_1152", "attn_g3+ffn_768", "attn_noop+ffn_384", "attn_linear+ffn_1536", "attn_g3+ffn_noop",
    )
    child = family.build_child(parent, [BlockSpec.parse(b) for b in layers])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        family.export(child, tmp_path / "child")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tok('The capital of France is', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "print('TEXT:' + repr(tok.decode(out[0, ids.shape[1]:])))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "child")], capture_output=True, text=True,
                            timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    text = ast.literal_eval(result.stdout.split("TEXT:", 1)[1].strip())
    expected = child.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert text == parent.tokenizer.decode(expected[0, ids.shape[1]:])
    assert text.strip()


def test_model_info_smollm2():
    result = subprocess.run([sys.executable, "-m", "puzzle_core.cli", "model", "info", "smollm2-135m"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "30 layers" in result.stdout and "134,515,008 parameters" in result.stdout
    assert "attn_g3 attn_g9 attn_linear attn_noop" in result.stdout


def test_model_check_passes_on_smollm2(tmp_path, capsys):
    from puzzle_core.cli import main

    assert main(["model", "check", "smollm2-135m", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out and out.count(" ok") == 7 * 6
