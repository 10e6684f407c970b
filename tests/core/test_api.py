"""``puzzle_core.api`` is the one surface plugins import: documented, current, and enough to write a plugin."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
from pathlib import Path

from fake_distributions import site_packages  # noqa: F401  (fixture)

from puzzle_core import api
from puzzle_core.cli import main

ROOT = Path(__file__).resolve().parents[2]

# A third-party cost-model plugin as written against the first release: a new GPU from its
# datasheet (NVIDIA L40S, dense figures). Moving to puzzle_core.api changed its imports only.
L40S_BEFORE = '''
from puzzle_core import hookimpl
from puzzle_plugins.roofline import GPUSpec, roofline_cost_model

L40S = GPUSpec(
    name="NVIDIA L40S 48GB",
    memory_gib=48,
    bandwidth_gbs=864,
    peak_tflops={"fp32": 91.6, "bf16": 362.1, "fp8": 733.0},
    source="NVIDIA L40S datasheet (dense)",
)
@hookimpl
def puzzle_cost_models():
    return [roofline_cost_model("l40s", L40S)]
'''
L40S_NOW = L40S_BEFORE.replace(
    "from puzzle_core import hookimpl\nfrom puzzle_plugins.roofline import GPUSpec, roofline_cost_model",
    "from puzzle_core.api import hookimpl\nfrom puzzle_core.api import GPUSpec, roofline_cost_model",
)


def load_reference_generator():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "docs" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_page_documents_exactly_the_api_and_is_current():
    generator = load_reference_generator()
    page = (ROOT / "docs" / "api.md").read_text()
    assert page == generator.render(), "docs/api.md is stale: run python docs/api_reference.py"
    documented = re.findall(r"^### `(\w+)`$", page, re.M)
    assert len(documented) == len(set(documented)) and set(documented) == generator.documented_names()
    assert set(api.__all__) <= set(documented)


def test_every_name_resolves_once_and_is_documented():
    generator = load_reference_generator()
    modules = [api] + [importlib.import_module(name) for _, name in generator.SUBMODULES]
    undocumented = []
    for module in modules:
        assert len(set(module.__all__)) == len(module.__all__)
        for name in module.__all__:
            value = getattr(module, name)
            if (inspect.isclass(value) or inspect.isfunction(value)) and not inspect.getdoc(value):
                undocumented.append(f"{module.__name__}.{name}")
    assert undocumented == []


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_contributing_examples_use_only_the_api():
    from puzzle_core.api import decoder, testing

    public = {"puzzle_core.api": set(api.__all__), "puzzle_core.api.decoder": set(decoder.__all__),
              "puzzle_core.api.testing": set(testing.__all__)}
    blocks = python_blocks(ROOT / "CONTRIBUTING.md")
    assert len(blocks) >= 10
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("puzzle_core", "puzzle_plugins"):
                assert node.module in public, f"CONTRIBUTING imports {node.module}"
                assert {alias.name for alias in node.names} <= public[node.module]
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("puzzle_core", "puzzle_plugins")) for a in node.names)


def test_the_thirteen_line_l40s_plugin_works_with_only_its_imports_changed(site_packages, tmp_path, capsys):
    from puzzle_core.registry import get_registries

    changed = [(a, b) for a, b in zip(L40S_BEFORE.splitlines(), L40S_NOW.splitlines()) if a != b]
    assert len(changed) == 2 and all(b.startswith("from puzzle_core.api import ") for _, b in changed)
    assert len(L40S_NOW.strip().splitlines()) == 13
    site_packages.install("puzzle-l40s", {"l40s": L40S_NOW})
    assert main(["plugins", "--json"]) == 0
    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)["cost_models"]}
    assert listed["l40s"]["distribution"] == "puzzle-l40s" and "NVIDIA L40S 48GB" in listed["l40s"]["description"]
    config = tmp_path / "l40s.yaml"
    config.write_text("costs:\n  model: l40s\nscenario:\n  dtype: fp8\n  batch_size: 8\n")
    assert main(["config", "validate", str(config)]) == 0
    # priced like any roofline: the same 70B-wide block takes longer on the L40S than on an H100
    shape = api.ModelShape("llama", 1, 8192, 64, 8, 128, 28672, 128256, False, ())
    block = api.BlockSpec(api.AttentionSpec(n_heads_in_group=8), api.FFNSpec(intermediate_size=28672))
    scenario = api.Scenario(batch_size=8, dtype="bf16")
    registries = get_registries()
    l40s, h100 = (registries.cost_models.get(name).create() for name in ("l40s", "h100"))
    assert l40s.block_costs(shape, block, scenario, None)["runtime_ms"] > h100.block_costs(shape, block, scenario, None)[
        "runtime_ms"
    ]


def test_built_in_plugins_import_nothing_from_the_core_but_the_api():
    """What import-linter enforces in ``make test``, counted here too."""
    found = set()
    for path in (ROOT / "plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("puzzle_core"):
                found.add(node.module)
    assert found == {"puzzle_core.api", "puzzle_core.api.decoder"}
