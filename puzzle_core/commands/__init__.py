"""CLI sub-commands, one module per area; each exposes ``commands``, a list of click commands."""

MODULES = (
    "puzzle_core.commands.run",
    "puzzle_core.commands.model",
    "puzzle_core.commands.data",
    "puzzle_core.commands.library",
    "puzzle_core.commands.search",
)
