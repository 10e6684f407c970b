"""Security: nothing is unpickled, remote code is never trusted on our own, exported code is ours verbatim.

- **Source scan** (AST, every ``.py`` file of the package, the built-in plugins, the
  benchmarks and the examples): ``torch.load`` only with ``weights_only=True``; no pickle-
  family module is imported (``pickle``, ``dill``, ``joblib``, ``shelve``...); no
  ``allow_pickle=True``, ``weights_only=False`` or ``use_safetensors=False``; and
  ``trust_remote_code`` is never set to a literal ``True`` (it only passes the user's
  ``parent.trust_remote_code`` on, see ``test_parent_never_trusts_remote_code_unless_asked``
  in ``tests/core/test_model_cli.py``).
- **Behaviour**: a pickle whose loading would create a marker file, placed where a parent,
  a child or a library block is expected, is refused with a clear error (exit code 2) and
  the marker never appears; next to safetensors weights it is simply ignored.
- **Export**: the modeling code written next to a child is byte-identical to the family's
  own files and the shared ones they import, even when the parent's config holds strings
  that look like code, and the export holds no pickle file.
"""

from __future__ import annotations

import ast
import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from puzzle_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("puzzle_core", "plugins", "benchmarks", "examples")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}
BLOCKS = ["attn_noop+ffn_64", "attn_linear+ffn_linear", "attn_g4+ffn_noop", "attn_g2+ffn_128"]


# ---------------------------------------------------------------- source scan


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def unsafe_calls(source: str, name: str = "<source>") -> list[str]:
    """What in ``source`` could unpickle or trust remote code, as ``name:line: why``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                problems.append(f"{where}: imports from {node.module}")
            if module == "torch" and any(a.name == "load" for a in node.names):
                problems.append(f"{where}: imports torch.load by name (call it as torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                    and func.value.id == "torch" and not _is_true(keywords.get("weights_only", ast.Constant(None)))):
                problems.append(f"{where}: torch.load without weights_only=True")
            if _is_true(keywords.get("allow_pickle", ast.Constant(None))):
                problems.append(f"{where}: allow_pickle=True")
            for flag in ("weights_only", "use_safetensors"):
                if _is_false(keywords.get(flag, ast.Constant(None))):
                    problems.append(f"{where}: {flag}=False")
            if _is_true(keywords.get("trust_remote_code", ast.Constant(None))):
                problems.append(f"{where}: trust_remote_code=True")
            if isinstance(func, ast.Attribute) and func.attr == "read_pickle":
                problems.append(f"{where}: read_pickle")
    return problems


@pytest.mark.parametrize(
    "snippet",
    ["import torch\ntorch.load(path)\n", "import torch\ntorch.load(path, weights_only=False)\n",
     "import pickle\n", "from joblib import load\n", "from torch import load\n", "np.load(f, allow_pickle=True)\n",
     "AutoModel.from_pretrained(p, trust_remote_code=True)\n", "AutoModel.from_pretrained(p, use_safetensors=False)\n",
     "pd.read_pickle(f)\n"],
)
def test_the_scan_catches_each_unsafe_pattern(snippet):
    assert unsafe_calls(snippet)


def test_the_scan_accepts_the_safe_forms():
    safe = ("import torch\ntorch.load(path, weights_only=True)\n"
            "AutoModel.from_pretrained(p, trust_remote_code=section.trust_remote_code, use_safetensors=True)\n")
    assert unsafe_calls(safe) == []


def test_no_code_path_unpickles_or_trusts_remote_code():
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 50 and any(p.name == "family.py" for p in files), "the scan must see the whole source tree"
    problems = [problem for path in files
                for problem in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert problems == []


# ---------------------------------------------------------------- behaviour with hostile pickles


class Trap:
    """Unpickling this creates ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def trap(tmp_path):
    """``(write, marker)``: ``write(path)`` saves a trapped torch pickle at ``path``."""
    marker = tmp_path / "unpickled"

    def write(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Trap(marker)}, path)
        return path

    armed = write(tmp_path / "armed.pt")
    torch.load(armed, weights_only=False)  # the trap works: loading it this way runs its code
    assert marker.exists()
    marker.unlink()
    armed.unlink()
    return write, marker


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path_factory.getbasetemp() / "puzzle-cache"))


@pytest.fixture
def tiny_parent() -> Path:
    from puzzle_plugins.llama.aliases import tiny_random_llama

    return Path(tiny_random_llama())


def refused(capsys, *argv, words=()) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_a_pickle_file_as_parent_is_refused_unopened(trap, tmp_path, capsys):
    write, marker = trap
    refused(capsys, "model", "info", write(tmp_path / "model.pt"), words=("is a PyTorch pickle file", "safetensors"))
    refused(capsys, "model", "info", write(tmp_path / "pytorch_model.bin"), words=("is a PyTorch pickle file",))
    assert not marker.exists()


def test_a_parent_folder_with_only_pickled_weights_is_refused_unopened(trap, tiny_parent, tmp_path, capsys):
    write, marker = trap
    folder = Path(shutil.copytree(tiny_parent, tmp_path / "parent"))
    (folder / "model.safetensors").unlink()
    write(folder / "pytorch_model.bin")
    refused(capsys, "model", "info", folder, words=("only as PyTorch pickle files (pytorch_model.bin)",))
    config = tmp_path / "run.yaml"
    config.write_text(f"parent:\n  source: {json.dumps(str(folder))}\ndata:\n  corpus: synthetic\n")
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=("only as PyTorch pickle files",))
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_pickle_next_to_safetensors_weights_is_never_read(trap, tiny_parent, tmp_path, capsys):
    write, marker = trap
    folder = Path(shutil.copytree(tiny_parent, tmp_path / "parent"))
    write(folder / "pytorch_model.bin")
    assert main(["model", "info", str(folder)]) == 0, capsys.readouterr().err
    assert not marker.exists()


@pytest.fixture
def child(tmp_path, capsys) -> Path:
    (tmp_path / "blocks.json").write_text(json.dumps(BLOCKS))
    out = tmp_path / "child"
    blocks = str(tmp_path / "blocks.json")
    assert main(["model", "assemble", "tiny-random-llama", "--blocks", blocks, "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_a_child_with_only_pickled_weights_is_refused_unopened(trap, child, capsys):
    write, marker = trap
    (child / "model.safetensors").unlink()
    write(child / "pytorch_model.bin")
    refused(capsys, "model", "info", child, words=("only as PyTorch pickle files",))
    assert not marker.exists()


def test_a_pickle_in_place_of_a_library_block_is_refused_unopened(trap, tmp_path, capsys):
    """A library whose block file was swapped for a pickle (same name): its checksum no longer matches."""
    from puzzle_core.config import unstructure
    from puzzle_core.layout import BlockRecord
    from puzzle_core.rundir import sha256_file

    write, marker = trap
    run = tmp_path / "run"
    block = write(run / "library" / "blocks" / "layer_000" / "ffn_64.safetensors")
    record = unstructure(BlockRecord(
        job="layer_0/ffn_64", layer=0, attention=None, ffn="ffn_64", weights="library/blocks/layer_000/ffn_64.safetensors",
        sha256="0" * 64, settings_hash="", seed=0, steps=1, tokens=32, train_loss_initial=1.0, train_loss_final=0.5,
        train_loss_min=0.5, heldout_loss_before=None, heldout_loss_after=None, loss_curve=[0.5], wall_s=1.0, cpu_s=1.0,
        train_s=1.0, train_cpu_s=1.0, train_tokens_per_s=32.0, peak_memory_mib=None, device="cpu", threads=1,
    ))
    index = {"mode": "decoupled", "layers": [
        {"attention": ["attn_g2"], "ffn": ["ffn_128", "ffn_64"], "blocks": ["attn_g2+ffn_128", "attn_g2+ffn_64"],
         "trained": {"ffn_64": record} if i == 0 else {}} for i in range(4)]}
    (run / "library" / "index.json").write_text(json.dumps(index))
    (tmp_path / "blocks.json").write_text(json.dumps(["attn_g2+ffn_64"] + ["attn_g2+ffn_128"] * 3))
    argv = ["model", "assemble", "tiny-random-llama", "--blocks", tmp_path / "blocks.json", "--out", tmp_path / "child",
            "--library", run / "library"]
    refused(capsys, *argv, words=("ffn_64.safetensors is missing or damaged",))
    record["sha256"] = sha256_file(block)  # even with a matching checksum, safetensors does not unpickle
    (run / "library" / "index.json").write_text(json.dumps(index))
    refused(capsys, *argv, words=("ffn_64.safetensors cannot be read",))
    assert not marker.exists() and not (tmp_path / "child").exists()


# ---------------------------------------------------------------- exported code


CODE_LIKE = '"""\nimport os\nos.system("echo owned")\n"""  # {__import__("os")}'


def test_exported_modeling_code_is_our_files_verbatim(tiny_parent, tmp_path):
    from puzzle_core.blocks import BlockSpec
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries
    from puzzle_core.schema import ParentSection

    family, parent = load_parent(ParentSection(source=str(tiny_parent)), get_registries())
    parent.model.config.name_or_path = CODE_LIKE  # strings a hostile parent could carry into the export
    parent.model.config.architectures = ["LlamaForCausalLM", CODE_LIKE]
    parent.model.config.custom_note = CODE_LIKE
    child = family.build_child(parent, [BlockSpec.parse(b) for b in BLOCKS])
    family.export(child, tmp_path / "child")
    sources = {"configuration_decilm.py": ROOT / "plugins" / "llama", "modeling_decilm.py": ROOT / "plugins" / "llama",
               "block_configs.py": ROOT / "puzzle_core" / "decoder" / "child_code",
               "heterogeneous_decoder.py": ROOT / "puzzle_core" / "decoder" / "child_code"}
    exported = sorted(p.name for p in (tmp_path / "child").glob("*.py"))
    assert exported == sorted(sources)
    for name in exported:
        assert (tmp_path / "child" / name).read_bytes() == (sources[name] / name).read_bytes(), name
    assert not [p for p in (tmp_path / "child").iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert json.loads((tmp_path / "child" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
