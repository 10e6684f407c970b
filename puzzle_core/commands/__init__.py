"""CLI sub-commands, one module per area; each exposes ``commands``, a list of click commands."""

import click

overrides_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATH=VALUE",
    help="Override a config value (repeatable), e.g. --set search.speedup=2 --set gkd.tokens=32768; VALUE is YAML.",
)

MODULES = (
    "puzzle_core.commands.run",
    "puzzle_core.commands.model",
    "puzzle_core.commands.data",
    "puzzle_core.commands.library",
    "puzzle_core.commands.search",
)
