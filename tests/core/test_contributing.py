"""Every code block in CONTRIBUTING.md runs, or is a file of an example package quoted verbatim.

- A block whose first line is ``# examples/<path>`` must equal that file exactly; the
  files are the installed example packages, tested by their own tests (the Python ones are
  imported here: the package's modules, or the child code through the family's ``ChildCode``).
- Every other ``python`` block is executed as a module, in order (a block headed
  ``# my_puzzle_plugin.py`` becomes that module, so later blocks can import it). Its hook
  implementations are registered through the real plugin machinery and every record
  whose options have defaults is built; its ``test_*`` functions are called.
- ``toml`` and ``yaml`` blocks parse; every ``puzzle`` sub-command a ``bash`` block runs
  exists.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

from puzzle_core.api import plugin_registries

ROOT = Path(__file__).resolve().parents[2]
CONTRIBUTING = ROOT / "CONTRIBUTING.md"


def blocks() -> list[tuple[str, str, int]]:
    """``(language, text, line)`` of every fenced block."""
    text = CONTRIBUTING.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1)
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def quoted_file(text: str) -> Path | None:
    first = text.splitlines()[0]
    match = re.fullmatch(r"# (examples/\S+)", first)
    return ROOT / match.group(1) if match else None


def test_the_guide_has_the_blocks_it_promises():
    languages = [language for language, _, _ in blocks()]
    assert languages.count("python") >= 15 and "" not in languages, "every block names its language"
    quoted = [quoted_file(text) for _, text, _ in blocks() if quoted_file(text)]
    package = ROOT / "examples" / "puzzle-qwen2"
    assert set(quoted) == {package / "pyproject.toml", *(package / "puzzle_qwen2").glob("*.py")}


@pytest.mark.parametrize("language,text,line", [b for b in blocks() if quoted_file(b[1])], ids=lambda v: str(v))
def test_quoted_files_are_verbatim_and_import(language, text, line):
    path = quoted_file(text)
    assert path.is_file(), f"CONTRIBUTING.md:{line} quotes {path}, which does not exist"
    body = text.split("\n", 1)[1]
    assert body == path.read_text(), f"CONTRIBUTING.md:{line} differs from {path.relative_to(ROOT)}"
    if path.suffix != ".py":
        tomllib.loads(body)
        return
    from puzzle_qwen2.family import Qwen2Family

    if path.name in Qwen2Family.code.files():  # child code: loaded the way an export is
        assert Qwen2Family.code.files()[path.name] == path.resolve()
        assert Qwen2Family.code.model_class.__name__ == "Qwen2NASForCausalLM"
    else:
        module = "puzzle_qwen2" if path.name == "__init__.py" else f"puzzle_qwen2.{path.stem}"
        assert Path(importlib.import_module(module).__file__).resolve() == path.resolve()


def _module_name(text: str, line: int) -> str:
    match = re.match(r"# (\w+)\.py\n", text)
    return match.group(1) if match else f"contributing_block_{line}"


def test_every_other_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names, built, tests = [], set(), 0
    try:
        for language, text, line in blocks():
            if language != "python" or quoted_file(text):
                continue
            name = _module_name(text, line)
            module = types.ModuleType(name)
            module.__file__ = str(tmp_path / f"{name}.py")
            sys.modules[name] = module
            names.append(name)
            exec(compile(text, f"CONTRIBUTING.md:{line}", "exec"), module.__dict__)  # noqa: S102 (our own guide)
            if any(hasattr(value, "puzzle_impl") for value in vars(module).values()):
                registries = plugin_registries(module)
                for _, registry in registries.items():
                    for entry in registry:
                        try:
                            options = entry.record.options()
                        except TypeError:  # options without defaults (a corpus path): the record is checked enough
                            continue
                        entry.record.create(options)
                        built.add(f"{entry.record.kind}:{entry.name}")
            for test in [value for key, value in vars(module).items() if key.startswith("test_") and callable(value)]:
                parameters = inspect.signature(test).parameters
                test(**({"tmp_path": tmp_path / test.__name__} if "tmp_path" in parameters else {}))
                tests += 1
    finally:
        for name in names:
            sys.modules.pop(name, None)
    assert {"solvers:random", "cost_models:a100", "architectures:qwen2", "commands:summary"} <= built
    assert len(built) == 9 and tests == 2  # a component of every kind but the corpus (it needs a path); two tests


def test_data_blocks_parse_and_bash_blocks_name_real_commands():
    from puzzle_core.cli import cli

    commands = set(cli.list_commands(None))
    for language, text, line in blocks():
        if language == "yaml":
            assert isinstance(yaml.safe_load(text), dict), f"CONTRIBUTING.md:{line}"
        elif language == "toml":
            tomllib.loads(text)
        elif language == "bash":
            for command in re.findall(r"(?:^|\s|/)puzzle ([a-z][\w-]*)", text, re.M):
                assert command in commands, f"CONTRIBUTING.md:{line} runs 'puzzle {command}', which does not exist"
