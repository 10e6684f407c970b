"""The ``puzzle`` command line: plugin listing, exit codes, clean errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_distributions import site_packages, solver_plugin  # noqa: F401  (fixture)

from puzzle_core.cli import main
from puzzle_core.records import KINDS

BROKEN_IMPORT = "import puzzle_no_such_module\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plugins_json_lists_every_kind_with_name_distribution_description(capsys):
    code, out, err = run(capsys, "plugins", "--json")
    assert code == 0 and err == ""
    listing = json.loads(out)
    assert list(listing) == list(KINDS) == [
        "architectures",
        "block_variants",
        "scorers",
        "cost_models",
        "solvers",
        "distillation_losses",
        "evaluators",
        "executors",
        "corpora",
        "commands",
    ]
    for kind, items in listing.items():
        assert [item["name"] for item in items] == sorted(item["name"] for item in items)
        for item in items:
            assert set(item) == {"name", "distribution", "version", "description"}
            assert all(isinstance(value, str) for value in item.values())
    built_in = {item["name"] for item in listing["solvers"] if item["distribution"] == "puzzle-nas"}
    assert {"mip", "greedy"} <= built_in


def test_plugins_json_shows_a_new_distribution_by_its_name(site_packages, capsys):
    site_packages.install("acme-solvers", {"acme": solver_plugin("acme_search")})
    listing = json.loads(run(capsys, "plugins", "--json")[1])
    assert {"name": "acme_search", "distribution": "acme-solvers", "version": "1.0",
            "description": "a test solver"} in listing["solvers"]


def test_plugins_text_has_a_heading_per_kind(site_packages, capsys):
    site_packages.install("acme-solvers", {"acme": solver_plugin("acme_search")})
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    headings = [line for line in lines if line and not line.startswith(" ")]
    assert headings == [kind.replace("_", " ") for kind in KINDS]
    assert any(line.split() == ["acme_search", "acme-solvers", "1.0", "a", "test", "solver"] for line in lines)


def test_a_broken_plugin_is_one_warning_line_and_the_listing_still_works(site_packages, capsys):
    site_packages.install("broken-dist", {"broken": BROKEN_IMPORT})
    code, out, err = run(capsys, "plugins", "--json")
    assert code == 0
    assert err.startswith("Warning: Plugin entry point 'broken'") and "'broken-dist'" in err
    assert "Traceback" not in err
    assert json.loads(out)["solvers"], "the other plugins are listed"


def test_strict_plugins_turn_the_warning_into_exit_code_2(site_packages, capsys, monkeypatch):
    site_packages.install("broken-dist", {"broken": BROKEN_IMPORT})
    monkeypatch.setenv("PUZZLE_STRICT_PLUGINS", "1")
    code, out, err = run(capsys, "plugins")
    assert code == 2 and out == ""
    assert err.startswith("Plugin error: Plugin entry point 'broken'") and "PUZZLE_STRICT_PLUGINS=1" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--version"], 0),
        (["--help"], 0),
        (["plugins", "--help"], 0),
        (["no-such-command"], 2),
        (["plugins", "--no-such-option"], 2),
        (["config", "validate"], 2),
    ],
)
def test_exit_codes(argv, code, capsys):
    assert main(argv) == code


def test_version_names_the_program(capsys):
    from puzzle_core import __version__

    assert run(capsys, "--version")[1] == f"puzzle, version {__version__}\n"


def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    script = Path(sys.executable).with_name("puzzle")
    command = [str(script)] if script.exists() else [shutil.which("puzzle") or "puzzle"]
    config = tmp_path / "bad.yaml"
    config.write_text("search:\n  solver:\n    name: mip\n    gap: abc\n")
    result = subprocess.run([*command, "config", "validate", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "config error at $.search.solver.gap: expected float, got 'abc'" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_names_are_a_plugin_error_with_exit_code_2(site_packages, capsys):
    site_packages.install("acme-solvers", {"acme": solver_plugin("fast_search")})
    site_packages.install("zenith-solvers", {"zenith": solver_plugin("fast_search")})
    code, out, err = run(capsys, "plugins", "--json")
    assert code == 2 and out == ""
    assert err.startswith("Plugin error: Two plugins register the solvers name 'fast_search'")
    assert "'acme-solvers'" in err and "'zenith-solvers'" in err and "Traceback" not in err


HELLO_COMMAND = """
    import click

    from puzzle_core.api import Command, CommandPlugin, UserError, hookimpl

    @click.command()
    @click.argument("who")
    def hello(who):
        if who == "nobody":
            raise UserError("Nobody to greet; name someone.")
        click.echo(f"hello {who}")

    class Hello(Command):
        def click_command(self):
            return hello

    class Clash(Command):
        def click_command(self):
            return hello

    @hookimpl
    def puzzle_commands():
        return [CommandPlugin(name="hello", implementation=Hello, description="greets"),
                CommandPlugin(name="run", implementation=Clash, description="clashes with puzzle run")]
"""


def test_puzzle_commands_hook_adds_a_command_and_cannot_replace_a_built_in(site_packages, capsys):
    site_packages.install("hello-command", {"hello": HELLO_COMMAND})
    code, out, err = run(capsys, "hello", "world")
    assert (code, out) == (0, "hello world\n")
    assert "Command 'run' of plugin 'hello' from distribution 'hello-command' has the name of a built-in" in err
    code, _, err = run(capsys, "hello", "nobody")
    assert code == 2 and "Error: Nobody to greet; name someone." in err and "Traceback" not in err
    code, out, _ = run(capsys, "--help")
    assert "hello" in out and "greets" not in out  # listed by its click help, which has none
