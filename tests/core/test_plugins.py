"""The plugin manager: entry points, faults, strict mode, disabling, misspelt hooks, addhooks."""

from __future__ import annotations

import importlib.metadata
import json
import textwrap
import types
import warnings

import pytest
from fake_distributions import site_packages, solver_plugin  # noqa: F401  (fixture)

from puzzle_core.errors import PluginError
from puzzle_core.plugins import PluginWarning, make_plugin_manager
from puzzle_core.registry import build_registries

BROKEN_IMPORT = """
    import puzzle_no_such_module  # noqa: F401
"""

MISSPELT_HOOK = """
    from puzzle_core.api import hookimpl
    from puzzle_core.records import SolverPlugin

    @hookimpl
    def puzzle_solver():
        return [SolverPlugin(name="misspelt", implementation=dict)]
"""


def load_quietly():
    """A manager loaded from the entry points, failing the test on any plugin warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        return make_plugin_manager()


def test_built_in_plugins_come_from_our_own_entry_points():
    manager = load_quietly()
    declared = [ep for ep in importlib.metadata.entry_points(group="puzzle") if ep.dist.name == "puzzle-nas"]
    assert len(declared) >= 8
    for entry_point in declared:
        assert manager.has_plugin(entry_point.name)
        assert manager.distribution_of(entry_point.name) == "puzzle-nas"


def test_temporary_distribution_is_loaded_with_its_distribution_name(site_packages):
    site_packages.install("acme-solvers", {"acme": solver_plugin("acme_search")})
    manager = load_quietly()
    assert manager.distribution_of("acme") == "acme-solvers"
    entry = build_registries(manager).solvers.entry("acme_search")
    assert (entry.plugin, entry.distribution) == ("acme", "acme-solvers")


def test_broken_import_is_a_warning_naming_entry_point_and_distribution(site_packages):
    site_packages.install("broken-dist", {"broken": BROKEN_IMPORT})
    site_packages.install("good-dist", {"good": solver_plugin("good_search")})
    with pytest.warns(PluginWarning) as caught:
        manager = make_plugin_manager()
    (message,) = [str(w.message) for w in caught]
    assert "'broken'" in message and "'broken-dist'" in message
    assert "ModuleNotFoundError" in message and "puzzle_no_such_module" in message
    assert not manager.has_plugin("broken")
    registries = build_registries(manager)
    assert "good_search" in registries.solvers
    assert manager.has_plugin("llama"), "built-ins keep working"


def test_strict_plugins_make_a_broken_import_fatal(site_packages, monkeypatch):
    site_packages.install("broken-dist", {"broken": BROKEN_IMPORT})
    monkeypatch.setenv("PUZZLE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'broken'.*'broken-dist'.*failed to import.*PUZZLE_STRICT_PLUGINS=1"):
        make_plugin_manager()


def test_disabled_plugins_are_not_even_imported(site_packages, monkeypatch):
    site_packages.install("broken-dist", {"broken": BROKEN_IMPORT})
    site_packages.install("good-dist", {"good": solver_plugin("good_search")})
    monkeypatch.setenv("PUZZLE_DISABLE_PLUGINS", "broken, good,greedy")
    manager = load_quietly()
    assert not manager.has_plugin("broken") and not manager.has_plugin("good") and not manager.has_plugin("greedy")
    assert manager.has_plugin("mip")


def test_a_distribution_name_disables_all_its_entry_points(site_packages, monkeypatch):
    site_packages.install("acme-tools", {"acme_a": solver_plugin("acme_a"), "acme_b": solver_plugin("acme_b")})
    monkeypatch.setenv("PUZZLE_DISABLE_PLUGINS", "acme-tools")
    manager = load_quietly()
    assert not manager.has_plugin("acme_a") and not manager.has_plugin("acme_b")


def test_same_entry_point_name_in_two_distributions_keeps_the_first(site_packages):
    site_packages.install("first-dist", {"shared": solver_plugin("first_search")})
    site_packages.install("second-dist", {"shared": solver_plugin("second_search")})
    with pytest.warns(PluginWarning, match=r"'shared'.*'second-dist'.*same name.*'first-dist'"):
        manager = make_plugin_manager()
    assert manager.distribution_of("shared") == "first-dist"


def test_check_pending_catches_a_misspelt_hook():
    manager = make_plugin_manager(load_entry_points=False)
    module = types.ModuleType("typo_plugin")
    exec(textwrap.dedent(MISSPELT_HOOK), module.__dict__)
    manager.register_plugin(module, "typo", "typo-dist")
    with pytest.raises(PluginError) as caught:
        manager.check_pending()
    message = str(caught.value)
    assert "Plugin 'typo' from distribution 'typo-dist'" in message
    assert "'puzzle_solver'. Did you mean 'puzzle_solvers'?" in message


def test_misspelt_hook_in_an_entry_point_is_reported_and_its_plugin_skipped(site_packages, monkeypatch):
    site_packages.install("typo-dist", {"typo": MISSPELT_HOOK})
    with pytest.warns(PluginWarning, match=r"'typo' from distribution 'typo-dist'.*Did you mean 'puzzle_solvers'"):
        manager = make_plugin_manager()
    assert not manager.has_plugin("typo")
    manager.check_pending()  # nothing left pending
    monkeypatch.setenv("PUZZLE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="puzzle_solver"):
        make_plugin_manager()


def test_hook_with_arguments_the_spec_lacks_is_a_fault(site_packages):
    site_packages.install(
        "odd-dist",
        {
            "odd": """
                from puzzle_core.api import hookimpl

                @hookimpl
                def puzzle_solvers(config):
                    return []
            """
        },
    )
    with pytest.warns(PluginWarning, match=r"'odd'.*'odd-dist'.*could not be registered.*config"):
        manager = make_plugin_manager()
    assert not manager.has_plugin("odd")


SPEC_PLUGIN = """
    import pluggy

    from puzzle_core.api import hookimpl

    class TokenizerSpecs:
        @pluggy.HookspecMarker("puzzle")
        def puzzle_tokenizers(self):
            "Tokenizers by name. Example: ``return [{'name': 'bytes'}]``."

    @hookimpl
    def puzzle_addhooks(pluginmanager):
        pluginmanager.add_hookspecs(TokenizerSpecs)
"""

IMPLEMENTING_PLUGIN = """
    from puzzle_core.api import hookimpl

    @hookimpl
    def puzzle_tokenizers():
        return [{"name": "bytes"}]
"""


def test_puzzle_addhooks_lets_a_plugin_add_its_own_hookspec(site_packages):
    # 'a_user' is loaded (alphabetically) before the plugin that defines its hook
    site_packages.install("tok-user", {"a_user": IMPLEMENTING_PLUGIN})
    site_packages.install("tok-spec", {"b_spec": SPEC_PLUGIN})
    manager = load_quietly()
    assert manager.hook.puzzle_tokenizers() == [[{"name": "bytes"}]]
    manager.check_pending()
    # the spec came once, however many plugins registered after it
    assert manager.hook.puzzle_tokenizers.spec is not None


def test_puzzle_addhooks_that_raises_skips_only_that_plugin(site_packages):
    site_packages.install(
        "bad-spec",
        {
            "bad_spec": """
                from puzzle_core.api import hookimpl

                @hookimpl
                def puzzle_addhooks(pluginmanager):
                    raise RuntimeError("spec module missing")
            """
        },
    )
    site_packages.install("good-dist", {"good": solver_plugin("good_search")})
    with pytest.warns(PluginWarning, match=r"'bad_spec'.*'bad-spec'.*RuntimeError: spec module missing"):
        manager = make_plugin_manager()
    assert not manager.has_plugin("bad_spec")
    assert "good_search" in build_registries(manager).solvers


# ---------------------------------------------------------------- faults seen from the command line

RAISING_HOOK = """
    from puzzle_core.api import hookimpl

    @hookimpl
    def puzzle_solvers():
        raise RuntimeError("licence server unreachable")
"""

MALFORMED_RECORDS = """
    from puzzle_core.api import hookimpl

    @hookimpl
    def puzzle_solvers():
        return ["mip2"]
"""


@pytest.fixture
def library_file(tmp_path):
    path = tmp_path / "library.json"
    blocks = {"attn_g1+ffn_64": (10.0, 0.0), "attn_noop+ffn_noop": (1.0, 1.0)}
    path.write_text(json.dumps({f"layer_{i}": {b: {"stats": {"runtime_ms": r}, "metrics": {"kl": k}}
                                               for b, (r, k) in blocks.items()} for i in range(2)}))
    return path


@pytest.mark.parametrize("source, shown", [(RAISING_HOOK, "RuntimeError: licence server unreachable"),
                                           (MALFORMED_RECORDS, "expected a list of SolverPlugin records")],
                         ids=["hook raises", "malformed records"])
def test_a_faulty_plugin_is_one_warning_and_puzzle_search_still_works(source, shown, site_packages, library_file,
                                                                      capsys, monkeypatch):
    from puzzle_core.cli import main
    from puzzle_core.plugins import reset_plugin_manager
    from puzzle_core.registry import reset_registries

    site_packages.install("faulty-dist", {"faulty": source})
    assert main(["search", str(library_file), "--speedup", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "optimal"
    warnings_shown = [line for line in err.splitlines() if line.startswith("Warning:")]
    assert len(warnings_shown) == 1 and "plugin 'faulty' from distribution 'faulty-dist'" in warnings_shown[0]
    assert shown in warnings_shown[0] and "Traceback" not in err
    monkeypatch.setenv("PUZZLE_STRICT_PLUGINS", "1")
    reset_plugin_manager()  # as in a new process
    reset_registries()
    assert main(["search", str(library_file), "--speedup", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Plugin error: ") and "'faulty' from distribution 'faulty-dist'" in err and shown in err
    assert "PUZZLE_STRICT_PLUGINS=1" in err and "Traceback" not in err
