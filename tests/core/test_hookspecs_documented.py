"""Every hook specification has an example in its docstring, a section in CONTRIBUTING.md, and a test."""

from __future__ import annotations

import ast
import functools
import inspect
import re
from pathlib import Path

import pytest

from puzzle_core import hookspecs
from puzzle_core.records import RECORD_TYPES

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"

HOOKS = sorted(name for name, function in vars(hookspecs).items() if hasattr(function, "puzzle_spec"))


@functools.cache
def exercised_hooks() -> set[str]:
    """Hooks named by a test function in tests/, plus the kind hooks the registry test runs per kind."""
    found = set()
    for path in TESTS.rglob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found.update(hook for hook in HOOKS if hook in node.name)
    import test_registry

    (parametrize,) = [m for m in test_registry.test_each_kind_hook_fills_its_registry.pytestmark if m.name == "parametrize"]
    found.update(f"puzzle_{record_type.kind}" for record_type in parametrize.args[1])
    return found


def test_there_is_one_hook_per_kind_and_addhooks():
    assert HOOKS == sorted([f"puzzle_{t.kind}" for t in RECORD_TYPES] + ["puzzle_addhooks"])


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docstring_has_an_example(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert doc.splitlines()[0].endswith("."), "a one-line summary first"
    assert "Example: ``" in doc, "an example in double backticks"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_example_names_things_that_exist(hook):
    """Every class or function an example names is defined in puzzle, its plugins or the example packages."""
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    named = set(re.findall(r"(?:implementation|options)=(\w+)", doc))
    defined = set()
    for folder in ("puzzle_core", "plugins", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                    defined.add(node.name)
    assert named <= defined, named - defined


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_section_in_contributing(hook):
    text = CONTRIBUTING.read_text()
    (heading,) = [line for line in text.splitlines() if line.startswith("#") and f"`{hook}`" in line]
    section = re.split(r"\n#{2,3} ", text.split(heading, 1)[1], maxsplit=1)[0]
    assert "```python" in section, f"the {hook} section shows a minimal example"
    assert re.search(rf"def {hook}\(.*\) -> ", text), "the guide implements the hook, with its return annotation"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    assert hook in exercised_hooks()
