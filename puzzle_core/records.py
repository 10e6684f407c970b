"""Typed records that plugins return from their ``puzzle_<kind>`` hooks.

Each record names one thing a plugin offers and builds it: ``implementation`` is the
component's class (a subclass of the record's interface, e.g. :class:`SolverPlugin`
builds a :class:`~puzzle_core.interfaces.Solver`) or a factory function whose return
annotation names such a subclass. It is called with an instance of ``options`` (the
attrs class a config section is structured into). A record whose implementation builds
the wrong kind is refused when it is made, so the plugin fault names the plugin and its
distribution at registration, not at first use.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Callable, ClassVar, Generic, TypeVar

import attrs

from puzzle_core.errors import PluginError
from puzzle_core.interfaces import (
    Command,
    Corpus,
    CostModel,
    DistillationLoss,
    Evaluator,
    Executor,
    ModelFamily,
    Scorer,
    Solver,
    VariantProvider,
)

Component = TypeVar("Component")


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


def _return_class(factory: Callable) -> object:
    """What ``factory``'s return annotation names (a class), or ``None`` when it has none."""
    annotation = inspect.signature(factory).return_annotation
    if annotation is inspect.Signature.empty:
        return None
    if isinstance(annotation, str):
        namespace = dict(getattr(inspect.unwrap(factory), "__globals__", {}))
        try:
            annotation = eval(annotation, namespace)  # noqa: S307 (an annotation the plugin wrote)
        except Exception as exc:  # a name only imported under TYPE_CHECKING, say
            raise TypeError(f"its return annotation {annotation!r} cannot be resolved ({type(exc).__name__}: {exc})")
    return typing.get_origin(annotation) or annotation


def _builds_interface(instance: PluginRecord, _attribute, value) -> None:
    """``implementation`` must build the record's interface: a subclass, or a factory annotated to return one."""
    interface = type(instance).interface
    record = f"{type(instance).__name__} '{instance.name}'"
    wanted = f"a subclass of {interface.__name__} (from puzzle_core.api)"
    if isinstance(value, type):
        if not issubclass(value, interface):
            raise TypeError(
                f"{record}: implementation {value.__qualname__} is not {wanted}. Subclass {interface.__name__}, "
                f"or register it under the hook of its own kind."
            )
        return
    if not callable(value):
        raise TypeError(f"{record}: implementation must be {wanted} or a factory function, got {value!r:.100}")
    name = getattr(value, "__qualname__", repr(value))
    try:
        built = _return_class(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{record}: factory {name} cannot be checked: {exc}") from None
    if built is None:
        raise TypeError(
            f"{record}: factory {name} has no return annotation. Annotate it with the class it returns, "
            f"{wanted}, e.g. 'def make(options) -> My{interface.__name__}:'."
        )
    if not (isinstance(built, type) and issubclass(built, interface)):
        raise TypeError(f"{record}: factory {name} is annotated to return {built!r}, which is not {wanted}.")


@attrs.frozen
class PluginRecord(Generic[Component]):
    """What every registered thing has: a name, what builds it, its options class, a summary."""

    kind: ClassVar[str] = ""
    interface: ClassVar[type] = object

    name: str = attrs.field(validator=_is_identifier)
    implementation: type[Component] | Callable[..., Component] = attrs.field(validator=_builds_interface)
    options: type = attrs.field(default=NoOptions, validator=_is_options_class)
    description: str = attrs.field(default="", validator=attrs.validators.instance_of(str))

    def create(self, options: object = None) -> Component:
        """Build the component with ``options`` (the options class's defaults when ``None``).

        This is the one way components are built; a config's plugin choice carries the
        name and the already-structured options (:meth:`Registries.record`).
        """
        component = self.implementation(options if options is not None else self.options())
        if not isinstance(component, self.interface):
            raise PluginError(
                f"{type(self).__name__} '{self.name}' built {type(component).__name__}, which is not a "
                f"{self.interface.__name__}; its factory's return annotation is wrong."
            )
        return component

    @classmethod
    def label(cls) -> str:
        """What one of these is called in messages (``DistillationLossPlugin`` -> ``distillation loss``)."""
        return re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__.removesuffix("Plugin")).lower()


@attrs.frozen
class ArchitecturePlugin(PluginRecord[ModelFamily]):
    """A model family (``llama``): loads parents, builds and exports children."""

    kind: ClassVar[str] = "architectures"
    interface: ClassVar[type] = ModelFamily


@attrs.frozen
class BlockVariantsPlugin(PluginRecord[VariantProvider]):
    """A provider of alternative attention / FFN sub-blocks for an architecture."""

    kind: ClassVar[str] = "block_variants"
    interface: ClassVar[type] = VariantProvider


@attrs.frozen
class ScorerPlugin(PluginRecord[Scorer]):
    """A replace-1-block quality score (``kl``, ``lm_loss``...)."""

    kind: ClassVar[str] = "scorers"
    interface: ClassVar[type] = Scorer


@attrs.frozen
class CostModelPlugin(PluginRecord[CostModel]):
    """Runtime / memory / parameter costs of blocks for an inference scenario."""

    kind: ClassVar[str] = "cost_models"
    interface: ClassVar[type] = CostModel


@attrs.frozen
class SolverPlugin(PluginRecord[Solver]):
    """Chooses one variant per layer under constraints (``mip``, ``greedy``...)."""

    kind: ClassVar[str] = "solvers"
    interface: ClassVar[type] = Solver


@attrs.frozen
class DistillationLossPlugin(PluginRecord[DistillationLoss]):
    """A loss between a student's and a teacher's outputs (BLD and GKD)."""

    kind: ClassVar[str] = "distillation_losses"
    interface: ClassVar[type] = DistillationLoss


@attrs.frozen
class EvaluatorPlugin(PluginRecord[Evaluator]):
    """Measures a model (lm-eval tasks, KL to the parent, throughput)."""

    kind: ClassVar[str] = "evaluators"
    interface: ClassVar[type] = Evaluator


@attrs.frozen
class ExecutorPlugin(PluginRecord[Executor]):
    """Runs a list of independent jobs (in process, under torchrun, on a cluster)."""

    kind: ClassVar[str] = "executors"
    interface: ClassVar[type] = Executor


@attrs.frozen
class CorpusPlugin(PluginRecord[Corpus]):
    """A text source (``demo``, ``synthetic``, ``files``): what BLD, scoring and GKD read."""

    kind: ClassVar[str] = "corpora"
    interface: ClassVar[type] = Corpus


@attrs.frozen
class CommandPlugin(PluginRecord[Command]):
    """A ``puzzle`` sub-command (``bench``...)."""

    kind: ClassVar[str] = "commands"
    interface: ClassVar[type] = Command


RECORD_TYPES: tuple[type[PluginRecord], ...] = (
    ArchitecturePlugin,
    BlockVariantsPlugin,
    ScorerPlugin,
    CostModelPlugin,
    SolverPlugin,
    DistillationLossPlugin,
    EvaluatorPlugin,
    ExecutorPlugin,
    CorpusPlugin,
    CommandPlugin,
)
KINDS: tuple[str, ...] = tuple(t.kind for t in RECORD_TYPES)
