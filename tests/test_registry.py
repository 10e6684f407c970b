"""Registries: every kind's hook fills its registry; faults, duplicates and unknown names."""

from __future__ import annotations

import types

import attrs
import pytest
from fake_distributions import site_packages, solver_plugin  # noqa: F401  (fixture)

from puzzle_core import hookimpl
from puzzle_core.config import choice_type, structure
from puzzle_core.errors import PluginError, UnknownNameError
from puzzle_core.plugins import PluginWarning, make_plugin_manager, reset_plugin_manager
from puzzle_core.records import RECORD_TYPES, CostModel, DistillationLoss, NoOptions, Solver
from puzzle_core.registry import Registry, build_registries, create, get_registries


@attrs.frozen
class WidthOptions:
    width: int = 4


@attrs.frozen
class Component:
    """What a test record builds: it only remembers its options."""

    options: object


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
    record = record_type(name="thing", implementation=Component, options=WidthOptions, description="A thing.")
    manager_with((plugin_module("things", **{hook: lambda: [record]}), "things-dist"))
    registries = get_registries()
    registry = registries.kind(record_type.kind)
    assert registry is getattr(registries, record_type.kind)
    entry = registry.entry("thing")
    assert (entry.record, entry.plugin, entry.distribution) == (record, "things", "things-dist")
    # only its own kind got it
    assert all(len(r) == 0 for kind, r in registries.items() if kind != record_type.kind)
    # built by name with options structured from a config section, as the pipeline does
    choice = structure({"name": "thing", "width": "8"}, choice_type(record_type.kind))
    assert choice.create() == Component(WidthOptions(width=8))
    assert create(record_type.kind, "thing") == Component(WidthOptions())


def test_hook_that_raises_is_reported_and_the_rest_kept():
    def failing():
        raise RuntimeError("GPU table missing")

    faulty = plugin_module("faulty", puzzle_solvers=failing,
                           puzzle_cost_models=lambda: [CostModel(name="fine", implementation=Component)])
    good = plugin_module("good", puzzle_solvers=lambda: [Solver(name="ok", implementation=Component)])
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
        ([CostModel(name="wrong_kind", implementation=Component)], "CostModel(name='wrong_kind'"),
        (Solver(name="not_in_a_list", implementation=Component), "Solver(name='not_in_a_list'"),
        ({"name": "a_dict"}, "{'name': 'a_dict'}"),
    ],
    ids=["string", "wrong-kind", "bare-record", "dict"],
)
def test_malformed_records_are_reported_and_the_rest_kept(returned, shown):
    bad = plugin_module("sloppy", puzzle_solvers=lambda: returned)
    good = plugin_module("good", puzzle_solvers=lambda: [Solver(name="ok", implementation=Component)])
    manager = manager_with((bad, "sloppy-dist"), (good, "good-dist"))
    with pytest.warns(PluginWarning) as caught:
        registries = build_registries(manager)
    (message,) = [str(w.message) for w in caught]
    assert "plugin 'sloppy' from distribution 'sloppy-dist'" in message
    assert shown in message and "expected a list of Solver records" in message
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


def registry_of(*names: str, kind=Solver) -> Registry:
    manager = manager_with(
        (plugin_module("several", **{f"puzzle_{kind.kind}": lambda: [kind(name=n, implementation=Component) for n in names]}), "d")
    )
    return build_registries(manager).kind(kind.kind)


def test_unknown_name_lists_the_available_and_suggests_the_closest():
    solvers = registry_of("mip", "greedy", "max_params")
    with pytest.raises(UnknownNameError) as caught:
        solvers.get("gredy")
    message = str(caught.value)
    assert message.startswith("Unknown solver 'gredy'. Did you mean 'greedy'?")
    assert "Available solvers: greedy, max_params, mip." in message


def test_unknown_name_suggestion_ignores_case_and_is_left_out_when_nothing_is_close():
    losses = registry_of("normalized_mse", "cosine", kind=DistillationLoss)
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
        ({"implementation": "not callable"}, "callable"),
        ({"options": dict}, "attrs class"),
        ({"options": attrs.make_class("Named", {"name": attrs.field(default="x")})}, "field called 'name'"),
        ({"description": 3}, "description"),
    ],
)
def test_records_refuse_what_would_break_later(fields, problem):
    arguments = {"name": "fine", "implementation": Component, "options": NoOptions, **fields}
    with pytest.raises((TypeError, ValueError), match=problem):
        Solver(**arguments)


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
    ]
