"""The ``puzzle`` command line.

The core's sub-commands live next to the code they drive and are attached at the bottom
of this module; plugins add more through ``puzzle_commands`` (``bench`` is one). Every
:class:`~puzzle_core.errors.UserError` and :class:`~puzzle_core.errors.PluginError` (a
fault in a plugin's code, naming the plugin) becomes a one-paragraph message on stderr
and exit code 2; ``PUZZLE_DEBUG=1`` prints the traceback before it.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings

import click

from puzzle_core import __version__
from puzzle_core.commands import overrides_option
from puzzle_core.errors import PluginError, UserError
from puzzle_core.records import KINDS


class PuzzleGroup(click.Group):
    """A click group that turns our errors into clean messages and exit codes, with the plugins' commands."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugin_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._plugin_commands().get(name)

    def _plugin_commands(self) -> dict[str, click.Command]:
        """The commands of the registered ``puzzle_commands`` records; a broken one is a plugin fault."""
        from puzzle_core.plugins import report_plugin_fault
        from puzzle_core.registry import get_registries

        registries = get_registries()
        cached = getattr(self, "_plugins_built", None)
        if cached is not None and cached[0] is registries:  # built once per set of registries
            return cached[1]
        found = {}
        for entry in registries.commands:
            where = f"Command '{entry.name}' of plugin '{entry.plugin}' from distribution '{entry.distribution}'"
            if entry.name in self.commands:
                report_plugin_fault(f"{where} has the name of a built-in command.", skipped="It was skipped")
                continue
            try:
                command = entry.record.create().click_command()
            except Exception as exc:  # third-party code can fail in any way
                report_plugin_fault(f"{where} could not be built: {type(exc).__name__}: {exc}.", skipped="It was skipped")
                continue
            command.name = entry.name
            found[entry.name] = command
        self._plugins_built = (registries, found)
        return found

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _traceback_if_debugging(exc)
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except PluginError as exc:
            _traceback_if_debugging(exc)
            click.echo(f"Plugin error: {exc}", err=True)
            ctx.exit(2)


def _traceback_if_debugging(exc: BaseException) -> None:
    from puzzle_core.guarded import debugging

    if debugging():
        click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)


def _show_warnings_briefly() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"Warning: {message}", err=True)

    warnings.showwarning = show


@click.group(cls=PuzzleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="puzzle")
def cli() -> None:
    """puzzle: turn a trained LLM into a faster one for a chosen GPU and workload."""
    _show_warnings_briefly()


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {kind: [{name, distribution, version, description}]}.")
def plugins_command(as_json: bool) -> None:
    """List every registered plugin item by kind, with the distribution that supplied it."""
    from puzzle_core.registry import get_registries

    registries = get_registries()
    listing = {
        kind: [
            {"name": e.name, "distribution": e.distribution, "version": e.version, "description": e.record.description}
            for e in registry.entries()
        ]
        for kind, registry in registries.items()
    }
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for kind in KINDS:
        click.secho(kind.replace("_", " "), bold=True)
        for item in listing[kind] or [{"name": "(none)", "distribution": "", "version": "", "description": ""}]:
            supplier = f"{item['distribution']} {item['version']}".strip()
            click.echo(f"  {item['name']:<18} {supplier:<34} {item['description']}")


@cli.group("config")
def config_group() -> None:
    """Check and inspect run configs."""


@config_group.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
@overrides_option
def config_validate(path: str, overrides: tuple[str, ...]) -> None:
    """Check a config and that its plugins suit its scenario; prints every problem with its path, exit code 2 if any."""
    from puzzle_core.schema import check_config, load_config

    check_config(load_config(path, overrides), source=path)
    click.echo(f"{path}: OK")


@config_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@overrides_option
def config_show(path: str, overrides: tuple[str, ...]) -> None:
    """Print a config fully resolved, with every default filled in."""
    import yaml

    from puzzle_core.config import unstructure
    from puzzle_core.schema import load_config

    click.echo(yaml.safe_dump(unstructure(load_config(path, overrides)), sort_keys=False), nl=False)


def _attach_commands() -> None:
    import importlib

    from puzzle_core.commands import MODULES

    for module in MODULES:
        for command in importlib.import_module(module).commands:
            cli.add_command(command)


_attach_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    _show_warnings_briefly()  # before parsing: finding a plugin's command can warn
    try:
        # without standalone mode click returns ctx.exit()'s code instead of raising Exit
        result = cli.main(args=argv, prog_name="puzzle", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
