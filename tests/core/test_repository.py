"""The repository keeps its promises: files the README names exist, every shipped config validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from puzzle_core.cli import main
from puzzle_core.schema import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "benchmarks" / "eval_resolving.yaml"]
TOP_LEVEL = ("puzzle_core", "plugins", "configs", "benchmarks", "examples", "tests", "docs")
ROOT_FILES = ("README.md", "CONTRIBUTING.md", "Makefile", "pyproject.toml")

# Llama-3.1-8B's config.json, the fields a shape needs (public model card numbers)
LLAMA_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
}


def named_paths(text: str) -> set[str]:
    """Repository paths a text names: under a top-level folder of the repository, or a root file."""
    folders = "|".join(TOP_LEVEL)
    found = set(re.findall(rf"(?<![\w./-])((?:{folders})/[\w./-]*[\w/])", text))
    found |= {name for name in ROOT_FILES if name in text}
    folder = None  # the layout block: "configs/   tiny.yaml (...), demo.yaml (...\n   ...), h100.yaml (...)"
    for line in text.splitlines():
        heading = re.match(rf"({folders})/\s+(.*)", line)
        folder, rest = (heading.group(1), heading.group(2)) if heading else (folder, line) if line[:1] == " " else (None, "")
        if folder:
            found |= {f"{folder}/{name}" for name in re.findall(r"(?<![\w/.-])[\w-]+\.(?:yaml|md|py|toml)\b", rest)}
    return found


def test_every_file_the_readme_names_exists():
    names = named_paths((ROOT / "README.md").read_text())
    assert {"configs/h100.yaml", "configs/demo.yaml", "CONTRIBUTING.md", "benchmarks/README.md"} <= names
    missing = sorted(name for name in names if not (ROOT / name).exists())
    assert missing == []


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md", "CONTRIBUTING.md"])
def test_every_relative_link_and_picture_in_the_docs_exists(readme):
    path = ROOT / readme
    targets = re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text())
    assert targets, f"{readme} links nothing"
    missing = sorted(target for target in targets if not (path.parent / target).exists())
    assert missing == [], f"{readme} links files that do not exist"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path, capsys):
    assert main(["config", "validate", str(path)]) == 0, capsys.readouterr().err


def test_the_h100_config_is_an_8b_gpu_scenario_the_search_can_meet(registries):
    """bf16 on the h100 roofline, BLD and GKD on torchrun; the parent fits an H100 and 1.5x is reachable."""
    config = load_config(ROOT / "configs" / "h100.yaml")
    assert (config.parent.dtype, config.scenario.dtype, config.costs.model.name) == ("bf16", "bf16", "h100")
    for executor in (config.library.executor, config.gkd.executor):
        assert executor.name == "torchrun" and executor.options.nproc == 8
    family = registries.architectures.get("llama").create()
    shape = family.shape(LLAMA_8B)
    provider = registries.record(config.library.variants).create(config.library.variants.options)
    cost_model = registries.record(config.costs.model).create(config.costs.model.options)
    scenario = config.scenario
    fixed = cost_model.fixed_costs(shape, scenario, family)
    offered = [provider.variants(shape, layer).blocks() for layer in range(shape.num_layers)]
    runtime = {b.id: cost_model.block_costs(shape, b, scenario, family)["runtime_ms"] for b in offered[0]}
    memory = {b.id: cost_model.block_costs(shape, b, scenario, family)["memory_mib"] for b in offered[0]}
    parent = shape.blocks[0].id
    params = fixed["num_params"] + shape.num_layers * cost_model.block_costs(shape, shape.blocks[0], scenario)["num_params"]
    assert 8.0e9 < params < 8.1e9  # Llama-3.1-8B: 8.03B
    parent_runtime = fixed["runtime_ms"] + shape.num_layers * runtime[parent]
    fastest = fixed["runtime_ms"] + shape.num_layers * min(runtime.values())
    assert fastest < parent_runtime / config.search.speedup < parent_runtime
    parent_memory = fixed["memory_mib"] + shape.num_layers * memory[parent]
    assert parent_memory < cost_model.memory_capacity_mib(scenario)


def test_tests_run_with_a_cache_of_their_own(tmp_path_factory):
    from puzzle_core.api import cache_root

    user_cache = (Path.home() / ".cache" / "puzzle").resolve()
    assert cache_root().resolve() != user_cache
    assert cache_root().resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())
