"""Errors a user can act on.

Every problem caused by input (a config, a file, a plugin name, a constraint) is raised
as a :class:`UserError`: the CLI prints its one-paragraph message without a traceback
and exits with code 2.
"""

from __future__ import annotations

import difflib

USER_ERROR_EXIT_CODE = 2


class PuzzleError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(PuzzleError):
    """A problem with the user's input; the message names the problem and the fix."""

    exit_code = USER_ERROR_EXIT_CODE


class ConfigError(UserError):
    """One or more problems in a configuration, each with its path (``$.solver.gap``)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" (in {source})" if source else ""
        lines = [f"config error {p}{where}" for p in self.problems]
        super().__init__("\n".join(lines))


class PluginError(PuzzleError):
    """A plugin is broken (failed import, malformed record, raising hook)."""


class UnknownNameError(UserError):
    """A name that is not registered; the message lists the choices and the closest."""


def suggest(name: str, choices: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (case-insensitive), or ``""``."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""
