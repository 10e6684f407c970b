"""Typed records that plugins return from their ``puzzle_<kind>`` hooks.

Each record names one thing a plugin offers. ``implementation`` is a factory: it is
called with an instance of ``options`` (an attrs class that the config section is
structured into) and returns the component, which follows the interface of its kind
(see :mod:`puzzle_core.interfaces`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, ClassVar

import attrs


@attrs.frozen
class NoOptions:
    """Options class for components that take none."""


def _is_options_class(_instance, attribute, value):
    if not (isinstance(value, type) and attrs.has(value)):
        raise TypeError(f"{attribute.name} must be an attrs class, got {value!r}")
    if "name" in attrs.fields_dict(value):
        # a config section is {name: <plugin>, <options>}: an option called 'name' could never be set
        raise ValueError(f"{attribute.name} class {value.__name__} must not have a field called 'name'")


def _is_identifier(_instance, attribute, value):
    if not isinstance(value, str) or not value or not value.replace("_", "a").replace("-", "a").isalnum():
        raise ValueError(f"{attribute.name} must be a short name like 'my_solver', got {value!r}")


@attrs.frozen
class PluginRecord:
    """What every registered thing has: a name, a factory, its options class, a summary."""

    kind: ClassVar[str] = ""

    name: str = attrs.field(validator=_is_identifier)
    implementation: Callable[[Any], Any] = attrs.field(validator=attrs.validators.is_callable())
    options: type = attrs.field(default=NoOptions, validator=_is_options_class)
    description: str = attrs.field(default="", validator=attrs.validators.instance_of(str))

    def create(self, options: Any = None) -> Any:
        """Build the component with ``options`` (defaults when ``None``)."""
        return self.implementation(options if options is not None else self.options())

    @classmethod
    def label(cls) -> str:
        """What one of these is called in messages (``DistillationLoss`` -> ``distillation loss``)."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()


@attrs.frozen
class Architecture(PluginRecord):
    """A model family (``llama``): loads parents, builds and exports children."""

    kind: ClassVar[str] = "architectures"


@attrs.frozen
class BlockVariants(PluginRecord):
    """A provider of alternative attention / FFN sub-blocks for an architecture."""

    kind: ClassVar[str] = "block_variants"


@attrs.frozen
class Scorer(PluginRecord):
    """A replace-1-block quality score (``kl``, ``lm_loss``...)."""

    kind: ClassVar[str] = "scorers"


@attrs.frozen
class CostModel(PluginRecord):
    """Runtime / memory / parameter costs of blocks for an inference scenario."""

    kind: ClassVar[str] = "cost_models"


@attrs.frozen
class Solver(PluginRecord):
    """Chooses one variant per layer under constraints (``mip``, ``greedy``...)."""

    kind: ClassVar[str] = "solvers"


@attrs.frozen
class DistillationLoss(PluginRecord):
    """A loss between a student's and a teacher's outputs (BLD and GKD)."""

    kind: ClassVar[str] = "distillation_losses"


@attrs.frozen
class Evaluator(PluginRecord):
    """Measures a model (lm-eval tasks, KL to the parent, throughput)."""

    kind: ClassVar[str] = "evaluators"


@attrs.frozen
class Executor(PluginRecord):
    """Runs a list of independent jobs (in process, under torchrun, on a cluster)."""

    kind: ClassVar[str] = "executors"


RECORD_TYPES: tuple[type[PluginRecord], ...] = (
    Architecture,
    BlockVariants,
    Scorer,
    CostModel,
    Solver,
    DistillationLoss,
    Evaluator,
    Executor,
)
KINDS: tuple[str, ...] = tuple(t.kind for t in RECORD_TYPES)
