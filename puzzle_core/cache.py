"""The user cache: prepared data, tokenised corpora, converted parents.

Everything here can be rebuilt, so it lives outside run directories: ``$PUZZLE_CACHE``
when set, else ``~/.cache/puzzle``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created)."""
    return Path(os.environ.get("PUZZLE_CACHE") or Path.home() / ".cache" / "puzzle").expanduser()
