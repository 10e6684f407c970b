"""Built-in plugins of puzzle, registered through the ``puzzle`` entry points like any other.

Import this package as ``puzzle_plugins``; the folder name ``plugins`` is not an import name.
"""

if __name__ != "puzzle_plugins":  # pragma: no cover - guards a wrong sys.path
    raise ImportError("Import the built-in plugins as 'puzzle_plugins', not as a bare 'plugins'.")
