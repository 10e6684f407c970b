"""Registries: every kind's hook fills its registry; faults, duplicates and unknown names."""

from __future__ import annotations

import types

import attrs
import pytest
from fake_distributions import site_packages, solver_plugin  # noqa: F401  (fixture)

from puzzle_core.api import hookimpl
from puzzle_core.choices import choice_type
from puzzle_core.config import structure
from puzzle_core.errors import PluginError, UnknownNameError
from puzzle_core.plugins import PluginWarning, make_plugin_manager, reset_plugin_manager
from puzzle_core.records import (
    RECORD_TYPES,
    CommandPlugin,
    CostModelPlugin,
    DistillationLossPlugin,
    NoOptions,
    PluginRecord,
    SolverPlugin,
)
from puzzle_core.registry import Registry, build_registries, get_registries


@attrs.frozen
class WidthOptions:
    width: int = 4


def component_of(record_type: type[PluginRecord]) -> type:
    """A class of ``record_type``'s interface that only remembers its options (abstract methods stubbed)."""
    interface = record_type.interface
    stubs = {name: lambda self, *args, **kwargs: None for name in getattr(interface, "__abstractmethods__", ())}

    def __init__(self, options):
        self.options = options

    def __eq__(self, other):
        return type(self) is type(other) and self.options == other.options

    return type(f"Test{interface.__name__}", (interface,), {**stubs, "__init__": __init__, "__eq__": __eq__})


COMPONENTS = {t: component_of(t) for t in RECORD_TYPES}
Component = COMPONENTS[SolverPlugin]
COSTS = COMPONENTS[CostModelPlugin]


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose ``puzzle_<kind>`` hooks return what ``hooks`` give."""
    module = types.ModuleType(name)
    for hook_name, make_records in hooks.items():
        make_records.__name__ = hook_name
        setattr(module, hook_name, hookimpl(make_records))
    return module


def manager_with(*plugins: tuple[types.ModuleType, str]):
    """A manager holding only ``plugins`` (module, distribution), made process-wide."""
    manager = make_plugin_manager(load_entry_points=False)
    for module, distribution in plugins:
        manager.register_plugin(module, module.__name__, distribution)
    reset_plugin_manager(manager)
    return manager


@pytest.mark.parametrize("record_type", RECORD_TYPES, ids=lambda t: f"puzzle_{t.kind}")
def test_each_kind_hook_fills_its_registry(record_type):
    hook = f"puzzle_{record_type.kind}"
    component = COMPONENTS[record_type]
    record = record_type(name="thing", implementation=component, options=WidthOptions, description="A thing.")
    manager_with((plugin_module("things", **{hook: lambda: [record]}), "things-dist"))
    registries = get_registries()
    registry = registries.kind(record_type.kind)
    assert registry is getattr(registries, record_type.kind)
    entry = registry.entry("thing")
    assert (entry.record, entry.plugin, entry.distribution) == (record, "things", "things-dist")
    # only its own kind got it
    assert all(len(r) == 0 for kind, r in registries.items() if kind != record_type.kind)
    assert record.create() == component(WidthOptions())
    if record_type is not CommandPlugin:  # commands are not picked in configs
        # built by name with options structured from a config section, as the pipeline does
        choice = structure({"name": "thing", "width": "8"}, choice_type(record_type.kind))
        assert registries.record(choice).create(choice.options) == component(WidthOptions(width=8))


def test_hook_that_raises_is_reported_and_the_rest_kept():
    def failing():
        raise RuntimeError("GPU table missing")

    faulty = plugin_module("faulty", puzzle_solvers=failing,
                           puzzle_cost_models=lambda: [CostModelPlugin(name="fine", implementation=COSTS)])
    good = plugin_module("good", puzzle_solvers=lambda: [SolverPlugin(name="ok", implementation=Component)])
    manager = manager_with((faulty, "faulty-dist"), (good, "good-dist"))
    with pytest.warns(PluginWarning) as caught:
        registries = build_registries(manager)
    (message,) = [str(w.message) for w in caught]
    assert "puzzle_solvers of plugin 'faulty' from distribution 'faulty-dist'" in message
    assert "RuntimeError: GPU table missing" in message and "solvers were skipped" in message
    assert registries.solvers.names() == ["ok"]
    assert registries.cost_models.names() == ["fine"], "the plugin's other hooks keep working"


@pytest.mark.parametrize(
    "returned, shown",
    [
        (["not a record"], "'not a record'"),
        ([CostModelPlugin(name="wrong_kind", implementation=COSTS)], "CostModelPlugin(name='wrong_kind'"),
        (SolverPlugin(name="not_in_a_list", implementation=Component), "SolverPlugin(name='not_in_a_list'"),
        ({"name": "a_dict"}, "{'name': 'a_dict'}"),
    ],
    ids=["string", "wrong-kind", "bare-record", "dict"],
)
def test_malformed_records_are_reported_and_the_rest_kept(returned, shown):
    bad = plugin_module("sloppy", puzzle_solvers=lambda: returned)
    good = plugin_module("good", puzzle_solvers=lambda: [SolverPlugin(name="ok", implementation=Component)])
    manager = manager_with((bad, "sloppy-dist"), (good, "good-dist"))
    with pytest.warns(PluginWarning) as caught:
        registries = build_registries(manager)
    (message,) = [str(w.message) for w in caught]
    assert "plugin 'sloppy' from distribution 'sloppy-dist'" in message
    assert shown in message and "expected a list of SolverPlugin records" in message
    assert registries.solvers.names() == ["ok"]


def test_strict_plugins_make_hook_faults_fatal(monkeypatch):
    def failing():
        raise RuntimeError("boom")

    manager = manager_with((plugin_module("faulty", puzzle_solvers=failing), "faulty-dist"))
    monkeypatch.setenv("PUZZLE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'faulty' from distribution 'faulty-dist' raised RuntimeError: boom"):
        build_registries(manager)


def test_a_hook_returning_none_registers_nothing():
    manager = manager_with((plugin_module("quiet", puzzle_solvers=lambda: None), "quiet-dist"))
    assert len(build_registries(manager).solvers) == 0


def test_duplicate_names_are_an_error_naming_both_distributions(site_packages):
    site_packages.install("acme-solvers", {"acme": solver_plugin("fast_search")})
    site_packages.install("zenith-solvers", {"zenith": solver_plugin("fast_search")})
    with pytest.raises(PluginError) as caught:
        get_registries()
    message = str(caught.value)
    assert "'fast_search'" in message
    assert "plugin 'acme' from distribution 'acme-solvers'" in message
    assert "plugin 'zenith' from distribution 'zenith-solvers'" in message
    assert "PUZZLE_DISABLE_PLUGINS" in message


def test_duplicate_name_resolved_by_disabling_one(site_packages, monkeypatch):
    site_packages.install("acme-solvers", {"acme": solver_plugin("fast_search")})
    site_packages.install("zenith-solvers", {"zenith": solver_plugin("fast_search")})
    monkeypatch.setenv("PUZZLE_DISABLE_PLUGINS", "zenith")
    assert get_registries().solvers.entry("fast_search").distribution == "acme-solvers"


def registry_of(*names: str, kind=SolverPlugin) -> Registry:
    records = [kind(name=n, implementation=COMPONENTS[kind]) for n in names]
    manager = manager_with((plugin_module("several", **{f"puzzle_{kind.kind}": lambda: records}), "d"))
    return build_registries(manager).kind(kind.kind)


def test_unknown_name_lists_the_available_and_suggests_the_closest():
    solvers = registry_of("mip", "greedy", "max_params")
    with pytest.raises(UnknownNameError) as caught:
        solvers.get("gredy")
    message = str(caught.value)
    assert message.startswith("Unknown solver 'gredy'. Did you mean 'greedy'?")
    assert "Available solvers: greedy, max_params, mip." in message


def test_unknown_name_suggestion_ignores_case_and_is_left_out_when_nothing_is_close():
    losses = registry_of("normalized_mse", "cosine", kind=DistillationLossPlugin)
    with pytest.raises(UnknownNameError, match=r"Unknown distillation loss 'COSINE'\. Did you mean 'cosine'\?"):
        losses.get("COSINE")
    with pytest.raises(UnknownNameError) as caught:
        losses.get("zzzzzz")
    assert "Did you mean" not in str(caught.value)


def test_unknown_name_with_nothing_installed_says_so():
    manager_with()
    with pytest.raises(UnknownNameError, match=r"Available evaluators: \(none installed\)"):
        get_registries().evaluators.get("lm_eval")


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"name": "has space"}, "short name"),
        ({"name": ""}, "short name"),
        ({"implementation": "not callable"}, "a subclass of Solver"),
        ({"options": dict}, "attrs class"),
        ({"options": attrs.make_class("Named", {"name": attrs.field(default="x")})}, "field called 'name'"),
        ({"description": 3}, "description"),
    ],
)
def test_records_refuse_what_would_break_later(fields, problem):
    arguments = {"name": "fine", "implementation": Component, "options": NoOptions, **fields}
    with pytest.raises((TypeError, ValueError), match=problem):
        SolverPlugin(**arguments)


def test_record_labels_read_naturally():
    assert [t.label() for t in RECORD_TYPES] == [
        "architecture",
        "block variants",
        "scorer",
        "cost model",
        "solver",
        "distillation loss",
        "evaluator",
        "executor",
        "corpus",
        "command",
    ]


def test_a_record_of_the_wrong_kind_fails_when_its_hook_is_collected_naming_plugin_and_distribution():
    # a cost model registered as a solver: refused at registration, not at first use
    wrong = plugin_module("mixed_up", puzzle_solvers=lambda: [SolverPlugin(name="fast", implementation=COSTS)])
    manager = manager_with((wrong, "mixed-up-dist"))
    with pytest.warns(PluginWarning) as caught:
        registries = build_registries(manager)
    (message,) = [str(w.message) for w in caught]
    assert "plugin 'mixed_up' from distribution 'mixed-up-dist'" in message
    assert "SolverPlugin 'fast': implementation TestCostModel is not a subclass of Solver" in message
    assert "fast" not in registries.solvers


def make_solver(options: WidthOptions) -> Component:
    return Component(options)


def make_unannotated(options):
    return Component(options)


def make_cost_model(options) -> COSTS:
    return COSTS(options)


def test_a_factory_must_be_annotated_to_return_its_kind():
    assert SolverPlugin(name="ok", implementation=make_solver, options=WidthOptions).create() == Component(WidthOptions())
    with pytest.raises(TypeError, match="make_unannotated has no return annotation"):
        SolverPlugin(name="bare", implementation=make_unannotated)
    with pytest.raises(TypeError, match="is annotated to return .*TestCostModel.*not a subclass of Solver"):
        SolverPlugin(name="wrong", implementation=make_cost_model)
    with pytest.raises(TypeError, match="no return annotation"):
        SolverPlugin(name="lambda", implementation=lambda options: Component(options))


def test_a_factory_whose_annotation_lies_fails_when_built():
    def lies(options) -> Component:
        return COSTS(options)

    record = SolverPlugin(name="liar", implementation=lies)
    with pytest.raises(PluginError, match="SolverPlugin 'liar' built TestCostModel, which is not a Solver"):
        record.create()
