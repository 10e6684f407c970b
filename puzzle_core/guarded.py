"""Faults inside a model family's code, reported as that family's.

The pipeline and the ``puzzle model`` commands reach a family only through
:class:`GuardedFamily`: an exception its methods (or its layer runner's) raise that is not
one of ours becomes a :class:`~puzzle_core.errors.PluginError` naming the architecture,
its plugin and distribution, and the method that failed: one paragraph and exit code 2,
not a traceback through puzzle's internals. ``PUZZLE_DEBUG=1`` prints the traceback too.
A :class:`~puzzle_core.errors.UserError` the family raises on purpose passes unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from puzzle_core.errors import PluginError, PuzzleError
from puzzle_core.interfaces import LayerRunner, LoadedModel, ModelFamily, ModelShape
from puzzle_core.registry import Entry

DEBUG_VARIABLE = "PUZZLE_DEBUG"


def debugging() -> bool:
    """Whether ``PUZZLE_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in {"1", "true", "yes"}


def describe(entry: Entry) -> str:
    """``the 'qwen2' architecture (plugin 'qwen2' from distribution 'puzzle-qwen2' 0.1.0)``."""
    version = f" {entry.version}" if entry.version else ""
    return (f"the '{entry.name}' {entry.record.label()} (plugin '{entry.plugin}' from distribution "
            f"'{entry.distribution}'{version})")


def plugin_fault(entry: Entry, doing: str, exc: BaseException) -> PluginError:
    """A :class:`PluginError` saying that ``entry``'s code raised ``exc`` while ``doing``."""
    detail = " ".join(str(exc).split())
    error = PluginError(
        f"{describe(entry)[0].upper()}{describe(entry)[1:]} failed in {doing}: {type(exc).__name__}: {detail}. "
        f"This is a fault in that plugin's code, not in your input: report it to its authors (set "
        f"{DEBUG_VARIABLE}=1 for the traceback), or choose another architecture with parent.architecture."
    )
    error.__cause__ = exc
    return error


def guarded(entry: Entry, call: Callable, doing: str, *args, **kwargs):
    """``call(*args, **kwargs)``, its exceptions turned into :func:`plugin_fault`, except ours and damaged files."""
    from safetensors import SafetensorError

    try:
        return call(*args, **kwargs)
    except (PuzzleError, SafetensorError):  # a damaged weights file is the input's fault; callers say so
        raise
    except Exception as exc:  # third-party code can fail in any way
        raise plugin_fault(entry, doing, exc) from exc


def create_family(entry: Entry, options: object = None) -> GuardedFamily:
    """The family of an architecture entry, built and guarded."""
    return GuardedFamily(guarded(entry, entry.record.create, "its construction", options), entry)


class GuardedRunner(LayerRunner):
    """A family's :class:`LayerRunner` whose faults name the family."""

    def __init__(self, runner: LayerRunner, entry: Entry):
        self.runner, self.entry = runner, entry
        self.num_layers = runner.num_layers

    def embed(self, input_ids):
        return guarded(self.entry, self.runner.embed, "LayerRunner.embed()", input_ids)

    def context(self, hidden, attention_mask=None):
        return guarded(self.entry, self.runner.context, "LayerRunner.context()", hidden, attention_mask)

    def sublayer(self, layer, part):
        return guarded(self.entry, self.runner.sublayer, "LayerRunner.sublayer()", layer, part)

    def head(self, hidden):
        return guarded(self.entry, self.runner.head, "LayerRunner.head()", hidden)

    def head_projection(self):
        return guarded(self.entry, self.runner.head_projection, "LayerRunner.head_projection()")

    def layer(self, index, hidden, context):
        return guarded(self.entry, self.runner.layer, f"layer {index} of its model", index, hidden, context)


class GuardedFamily(ModelFamily):
    """A registered family whose faults name it; every other attribute is the family's own."""

    def __init__(self, family: ModelFamily, entry: Entry):
        self.family, self.entry = family, entry

    def __getattr__(self, name: str):
        if name in ("family", "entry"):  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.family, name)

    def _call(self, method: str, *args, **kwargs):
        return guarded(self.entry, getattr(self.family, method), f"{method}()", *args, **kwargs)

    @property
    def default_variants(self) -> str:
        return self.family.default_variants

    def detect(self, hf_config) -> bool:
        return self._call("detect", hf_config)

    def shape(self, hf_config) -> ModelShape:
        return self._call("shape", hf_config)

    def load_parent(self, source: str, dtype="fp32", trust_remote_code: bool = False) -> LoadedModel:
        return self._call("load_parent", source, dtype=dtype, trust_remote_code=trust_remote_code)

    def load_parent_layers(self, source: str, layers, dtype="fp32", trust_remote_code: bool = False,
                           ends: bool = False) -> LoadedModel:
        return self._call("load_parent_layers", source, layers, dtype=dtype, trust_remote_code=trust_remote_code,
                          ends=ends)

    def aliases(self) -> Mapping[str, Callable[[], Path]]:
        return self._call("aliases")

    def init_sublayer(self, parent, layer, spec, calibration, method="default"):
        return self._call("init_sublayer", parent, layer, spec, calibration, method)

    def build_child(self, parent, blocks, sublayers=None) -> LoadedModel:
        return self._call("build_child", parent, blocks, sublayers)

    def random_model(self, shape, dtype="fp32"):
        return self._call("random_model", shape, dtype)

    def layer_runner(self, model) -> LayerRunner:
        return GuardedRunner(self._call("layer_runner", model), self.entry)

    def export(self, child, out_dir) -> None:
        return self._call("export", child, out_dir)

    def load_child(self, path, dtype="fp32") -> LoadedModel:
        return self._call("load_child", path, dtype=dtype)
