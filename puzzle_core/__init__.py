"""puzzle: turn a trained LLM into a faster one for a chosen GPU and workload.

The core knows the Puzzle method (block library, replace-1-block scores, costs, search,
global distillation) but no model family, solver or device: those come from plugins
registered under the ``puzzle`` entry-point group, the built-ins included. Plugins import
from :mod:`puzzle_core.api` only.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
