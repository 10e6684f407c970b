"""The ablation runner's pieces: composing arm configs, sharing stages between run directories, baseline solvers."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_distributions import site_packages  # noqa: F401  (fixture)

from benchmarks import runner
from puzzle_core.config import read_yaml, stable_hash, structure, unstructure
from puzzle_core.errors import ConfigError, UserError
from puzzle_core.library import BlockLibrary
from puzzle_core.pipeline import Stage, run_pipeline
from puzzle_core.rundir import RunDir, atomic_write, link_missing
from puzzle_core.schema import PuzzleConfig
from puzzle_core.search import InfeasibleError, LayerRule, build_problem, run_solver

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


# ---------------------------------------------------------------- composing configs


def test_deep_merge_merges_mappings_and_replaces_lists_and_scalars():
    base = {"search": {"solver": "mip", "baselines": ["greedy"], "speedup": 1.5}, "seed": 0}
    overlay = {"search": {"baselines": [], "solver": {"name": "greedy"}}, "gkd": {"losses": ["kl"]}}
    merged = runner.deep_merge(base, overlay)
    assert merged == {
        "search": {"solver": {"name": "greedy"}, "baselines": [], "speedup": 1.5},
        "seed": 0,
        "gkd": {"losses": ["kl"]},
    }
    assert base["search"]["baselines"] == ["greedy"]  # inputs untouched


def ablation(arms: list[dict], **fields) -> runner.Ablation:
    data = {"title": "t", "description": "d", "reference": arms[0]["name"], "arms": arms, "name": "test", **fields}
    return structure(data, runner.Ablation)


def test_an_arm_config_stacks_budget_ablation_and_arm_overlays_then_scales(tmp_path):
    definition = ablation(
        [{"name": "base"}, {"name": "half", "overlay": {"gkd": {"lr": 0.5}}, "scale": {"library.tokens": 0.5},
                            "budgets": {"small": {"gkd": {"batch_size": 2}}, "full": {"gkd": {"lr": 0.7}}}}],
        overlay={"gkd": {"tokens": 512, "lr": 0.1}},
        budgets={"small": {"gkd": {"tokens": 256}}},
    )
    base, half = runner.plan(definition, "small", TINY, tmp_path)
    assert (base.config.gkd.tokens, base.config.gkd.lr, base.config.library.tokens) == (256, 0.1, 1024)
    assert (half.config.gkd.tokens, half.config.gkd.lr, half.config.library.tokens) == (256, 0.5, 512)
    assert (base.config.gkd.batch_size, half.config.gkd.batch_size) == (4, 2)  # the arm's own overlay at this budget
    assert base.config.search.baselines == []  # the small budget's overlay
    assert half.run_dir == tmp_path / "runs" / "small" / "test" / "half"
    assert base.config_hash == stable_hash(unstructure(base.config)) != half.config_hash


def test_arm_references_become_earlier_run_directories(tmp_path):
    definition = ablation([
        {"name": "first"},
        {"name": "second", "overlay": {"library": {"mode": "coupled", "subspace_solutions": "{arm:first}/s.json"}}},
    ])
    _, second = runner.plan(definition, "small", TINY, tmp_path)
    assert second.config.library.subspace_solutions == str((tmp_path / "runs/small/test/first").resolve()) + "/s.json"

    later = ablation([{"name": "a", "overlay": {"library": {"subspace_solutions": "{arm:b}/s.json"}}}, {"name": "b"}])
    with pytest.raises(UserError, match=r"refers to \{arm:b\}, which is not an arm listed before it"):
        runner.plan(later, "small", TINY, tmp_path)


def test_bad_arms_are_errors_naming_the_arm(tmp_path):
    with pytest.raises(ConfigError, match=r"\$\.search\.solvr.*arm 'typo'"):
        runner.plan(ablation([{"name": "typo", "overlay": {"search": {"solvr": "mip"}}}]), "small", TINY, tmp_path)
    with pytest.raises(UserError, match="scales 'library.mode'.*not a number"):
        runner.plan(ablation([{"name": "s", "scale": {"library.mode": 2}}]), "small", TINY, tmp_path)
    with pytest.raises(ConfigError, match="reference 'nope' is not one of the arms"):
        ablation([{"name": "a"}], reference="nope")
    with pytest.raises(ConfigError, match="distinct names"):
        ablation([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match="names a folder"):
        ablation([{"name": "../escape"}])
    with pytest.raises(ConfigError, match="budgets has \\['large'\\]"):
        ablation([{"name": "a", "budgets": {"large": {}}}])
    with pytest.raises(UserError, match="no ablation 'serach'.*search"):
        runner.load_ablation("serach")
    with pytest.raises(ConfigError, match=r"pairs name \['layer_dorp'\].*methods are layer_drop, mip"):
        ablation([{"name": "mip-2x"}, {"name": "layer_drop-2x"}],
                 pairs=[{"method": "mip", "against": "layer_dorp"}])


def reference_arms(base: Path, tmp_path: Path) -> dict[str, str]:
    """Config hash of each shipped ablation's Puzzle reference arm (MIP on KL, decoupled, full space, cosine+KL)."""
    hashes = {}
    for name in runner.available():
        definition = runner.load_ablation(name)
        planned = {p.arm.name: p for p in runner.plan(definition, "small", base, tmp_path)}
        hashes[name] = {arm: p.config_hash for arm, p in planned.items()}
    return hashes


def test_every_shipped_ablation_resolves_and_shares_the_puzzle_reference_arm(tmp_path):
    hashes = reference_arms(TINY, tmp_path)
    assert set(hashes) == {"search", "baselines", "frontier", "search_text", "search_objective", "gkd_uptraining",
                           "scoring", "search_space", "gkd_losses", "bld"}
    shared = {hashes["search"]["mip-1.5x"], hashes["baselines"]["puzzle-1.5x"], hashes["frontier"]["puzzle-1.5x"],
              hashes["search_text"]["puzzle-1.5x"], hashes["search_space"]["full"], hashes["gkd_losses"]["cosine+kl"]}
    assert len(shared) == 1, "identical reference arms run once and are reused by the other ablations"
    assert hashes["search_objective"]["kl-1.5x"] == hashes["search_text"]["puzzle_mix-1.5x"], "searched on the mix"
    assert [hashes["gkd_uptraining"][f"{m}_mix-1.5x"] for m in ("puzzle", "layer_drop")] == [
        hashes["search_text"][f"{m}_mix-1.5x"] for m in ("puzzle", "layer_drop")], "the 65,536-token arms are reused"
    assert all(len(set(arms.values())) == len(arms) for arms in hashes.values()), "arms of an ablation differ"


def test_results_compare_each_arm_with_the_reference():
    arms = [
        {"name": "ref", "metrics": {"after_gkd": {"kl_to_parent": 0.5}, "assembled": {"kl_to_parent": 1.0}}},
        {"name": "worse", "metrics": {"after_gkd": None, "assembled": {"kl_to_parent": 2.0}}},
        {"name": "failed", "metrics": None},
    ]
    assert runner.compare_with_reference(arms, "ref") == {"ref": 1.0, "worse": 4.0, "failed": None}


def test_an_arm_made_in_another_ablation_is_found_by_config_hash_with_its_commit(tmp_path):
    arms = [{"name": "a", "status": "ok", "config_hash": "h1", "git_commit": "c1"},
            {"name": "b", "status": "ok", "config_hash": "h2"},  # older results: the commit is the environment's
            {"name": "c", "status": runner.NOT_RUN, "config_hash": "h3", "git_commit": "c3"}]
    (tmp_path / "search_text.json").write_text(json.dumps({"environment": {"git_commit": "c0"}, "arms": arms}))
    (tmp_path / "frontier.small.json").write_text(json.dumps({"arms": [{**arms[0], "git_commit": "small"}]}))
    assert runner.commits_by_config(tmp_path, "full") == {"h1": "c1", "h2": "c0"}
    assert runner.commits_by_config(tmp_path, "small") == {"h1": "small"}
    assert runner.commits_by_config(tmp_path, "full", besides="search_text") == {}, "an ablation's own arms are not"


def test_budgeted_arms_are_paired_with_the_reference_methods_arm_at_their_budget():
    arms = [{"name": name} for name in ("puzzle-1.5x", "layer_drop-1.5x", "layer_drop-1.75x", "puzzle-2x",
                                         "uniform_width-2x", "extra")]
    assert runner.same_budget_counterparts(arms, "puzzle-1.5x") == {
        "puzzle-1.5x": "puzzle-1.5x", "layer_drop-1.5x": "puzzle-1.5x", "layer_drop-1.75x": None,
        "puzzle-2x": "puzzle-2x", "uniform_width-2x": "puzzle-2x", "extra": None}
    assert runner.same_budget_counterparts(arms, "extra") == {}, "a reference without a budget: no such comparison"


# ---------------------------------------------------------------- sharing stages between run directories


@pytest.fixture
def counting_stages(monkeypatch):
    """Two cheap stages: ``first`` writes a file from its config section, ``second`` copies it and reads a cache."""
    calls = []

    def first(ctx):
        calls.append(("first", ctx.run_dir.root.name))
        path = ctx.run_dir.path("first", "out.txt")
        atomic_write(path, f"seed {ctx.config.seed}")
        cache = ctx.run_dir.path("cache", "shared.txt")
        if not cache.exists():
            atomic_write(cache, "expensive")
        return [path]

    def second(ctx):
        calls.append(("second", ctx.run_dir.root.name, ctx.run_dir.path("cache", "shared.txt").exists()))
        path = ctx.run_dir.path("second", "out.txt")
        atomic_write(path, ctx.run_dir.path("first", "out.txt").read_text() + f" gkd {ctx.config.gkd.tokens}")
        return [path]

    for name, function in (("first", first), ("second", second)):
        module = types.ModuleType(f"fake_stage_{name}")
        module.run = function
        monkeypatch.setitem(sys.modules, module.__name__, module)
    stages = (
        Stage("first", ("seed",), "fake_stage_first", "first", caches=("cache",)),
        Stage("second", ("gkd",), "fake_stage_second", "second"),
    )
    monkeypatch.setattr("puzzle_core.pipeline.STAGES", stages)
    return calls


def config(**sections) -> PuzzleConfig:
    return structure({"threads": 1, **sections}, PuzzleConfig)


def test_stages_finished_elsewhere_with_the_same_hash_are_linked_not_rerun(tmp_path, counting_stages):
    donor, arm = tmp_path / "donor", tmp_path / "arm"
    run_pipeline(config(gkd={"tokens": 1}), donor, echo=lambda _: None)
    ctx = run_pipeline(config(gkd={"tokens": 2}), arm, echo=lambda _: None, reuse=[donor, arm])
    assert ctx.outcomes == {"first": "reused", "second": "ran"}
    assert counting_stages == [("first", "donor"), ("second", "donor", True), ("second", "arm", False)]
    assert (arm / "first" / "out.txt").stat().st_ino == (donor / "first" / "out.txt").stat().st_ino
    assert (arm / "second" / "out.txt").read_text() == "seed 0 gkd 2"
    assert (donor / "second" / "out.txt").read_text() == "seed 0 gkd 1"
    assert RunDir(arm).manifest()["first"] == RunDir(donor).manifest()["first"]

    again = run_pipeline(config(gkd={"tokens": 2}), arm, echo=lambda _: None, reuse=[donor])
    assert again.outcomes == {"first": "skipped", "second": "skipped"}


def test_a_stage_that_must_run_gets_the_donors_caches_and_rewrites_leave_the_donor_alone(tmp_path, counting_stages):
    donor, arm = tmp_path / "donor", tmp_path / "arm"
    run_pipeline(config(), donor, echo=lambda _: None)
    ctx = run_pipeline(config(seed=1), arm, echo=lambda _: None, reuse=[donor])
    assert ctx.outcomes == {"first": "ran", "second": "ran"}
    assert counting_stages[-1] == ("second", "arm", True)
    assert (arm / "cache" / "shared.txt").stat().st_ino == (donor / "cache" / "shared.txt").stat().st_ino
    atomic_write(arm / "cache" / "shared.txt", "changed")  # writers replace files, so the link breaks
    assert (donor / "cache" / "shared.txt").read_text() == "expensive"


def test_link_missing_links_a_file_or_a_folder_and_keeps_what_the_target_has(tmp_path):
    atomic_write(tmp_path / "a" / "parent.json", "donor")
    atomic_write(tmp_path / "a" / "deep" / "x.bin", "x")
    assert link_missing(tmp_path / "a" / "parent.json", tmp_path / "b" / "parent.json") == 1
    assert link_missing(tmp_path / "a", tmp_path / "b") == 1  # parent.json is there already
    assert (tmp_path / "b" / "deep" / "x.bin").read_text() == "x"
    atomic_write(tmp_path / "c" / "parent.json", "own")
    assert link_missing(tmp_path / "a" / "parent.json", tmp_path / "c" / "parent.json") == 0
    assert (tmp_path / "c" / "parent.json").read_text() == "own"
    assert link_missing(tmp_path / "missing", tmp_path / "d") == 0


def test_a_damaged_donor_output_is_not_adopted(tmp_path, counting_stages):
    donor, arm = tmp_path / "donor", tmp_path / "arm"
    run_pipeline(config(), donor, echo=lambda _: None)
    (donor / "first" / "out.txt").write_text("tampered")
    ctx = run_pipeline(config(), arm, echo=lambda _: None, reuse=[donor])
    assert ctx.outcomes == {"first": "ran", "second": "reused"}  # the hashes, not the damaged file, vouch for it
    assert (arm / "first" / "out.txt").read_text() == "seed 0"


def test_an_arm_whose_search_is_infeasible_still_records_the_stages_it_reused(tmp_path, counting_stages, monkeypatch):
    donor = tmp_path / "donor"
    run_pipeline(config(), donor, echo=lambda _: None)

    def infeasible(ctx):
        raise InfeasibleError("no child reaches 9x")

    monkeypatch.setattr(sys.modules["fake_stage_second"], "run", infeasible)
    monkeypatch.setattr(runner, "STAGE_NAMES", ("first", "second"))
    planned = runner.PlannedArm(structure({"name": "far-9x"}, runner.Arm), config(gkd={"tokens": 2}), tmp_path / "arm")
    result = runner.run_arm(planned, [donor], "frontier", echo=lambda _: None)
    assert result["status"] == "infeasible" and "9x" in result["error"]
    assert result["stages"] == {"first": "reused", "second": "not run"}


# ---------------------------------------------------------------- baseline solvers


def library(num_layers: int = 4) -> BlockLibrary:
    """Layers of a parent (runtime 10) with narrower FFNs and no-ops; later layers matter less."""
    runtimes = {"attn_g2+ffn_128": 10.0, "attn_g2+ffn_64": 8.0, "attn_g2+ffn_32": 7.0, "attn_noop+ffn_128": 6.0,
                "attn_g2+ffn_noop": 5.0, "attn_noop+ffn_noop": 0.0}
    damage = {"attn_g2+ffn_128": 0.0, "attn_g2+ffn_64": 0.1, "attn_g2+ffn_32": 0.3, "attn_noop+ffn_128": 0.2,
              "attn_g2+ffn_noop": 0.5, "attn_noop+ffn_noop": 1.0}
    return BlockLibrary([
        {name: {"stats": {"runtime_ms": runtime}, "metrics": {"kl": damage[name] / (layer + 1)}}
         for name, runtime in runtimes.items()}
        for layer in range(num_layers)
    ])


def solve(registries, solver: str, **problem):
    implementation = registries.solvers.get(solver).create()
    built = build_problem(library(), "metrics.kl", **problem)
    (solution,) = run_solver(implementation, built, solver)
    return [solution.chosen[f"layer_{i}"] for i in range(4)], solution


def test_layer_drop_removes_the_least_important_whole_layers_until_the_budget_holds(registries):
    blocks, solution = solve(registries, "layer_drop", constraints=["stats.runtime_ms<=20"])
    assert blocks == ["attn_g2+ffn_128", "attn_g2+ffn_128", "attn_noop+ffn_noop", "attn_noop+ffn_noop"]
    assert solution.status == "feasible" and solution.totals["stats.runtime_ms"] == 20
    parent, _ = solve(registries, "layer_drop", constraints=["stats.runtime_ms<=40"])
    assert parent == ["attn_g2+ffn_128"] * 4


def test_uniform_width_gives_every_layer_the_widest_ffn_that_fits(registries):
    blocks, _ = solve(registries, "uniform_width", constraints=["stats.runtime_ms<=30"])
    assert blocks == ["attn_g2+ffn_32"] * 4
    blocks, _ = solve(registries, "uniform_width", speedup=1.25)
    assert blocks == ["attn_g2+ffn_64"] * 4
    with pytest.raises(InfeasibleError, match=r"uniform_width: no FFN width.*1, 0\.5, 0\.25"):
        solve(registries, "uniform_width", constraints=["stats.runtime_ms<=27"])


def test_pruning_baselines_explain_what_they_need(registries):
    with pytest.raises(InfeasibleError, match="dropping all 4 droppable layers"):
        solve(registries, "layer_drop", constraints=["stats.runtime_ms>=50"])
    with pytest.raises(UserError, match="no layer offers the attn_noop\\+ffn_noop block"):
        solve(registries, "layer_drop", constraints=["stats.runtime_ms<=20"],
              layer_rules=[LayerRule(layers=[0, 1, 2, 3], forbid=["attn_noop+ffn_noop"])])
    with pytest.raises(UserError, match="layer rules forbid it in layer_0"):
        solve(registries, "uniform_width", layer_rules=[LayerRule(layers=[0], forbid=["attn_g2+ffn_128"])])


# ---------------------------------------------------------------- the command


def test_bench_lists_the_ablations_and_refuses_unknown_ones(tmp_path):

    from puzzle_core.cli import cli

    listing = CliRunner().invoke(cli, ["bench", "--list"])
    assert listing.exit_code == 0, listing.output
    assert "baselines" in listing.output and "layer_drop-1.25x, uniform_width-1.25x" in listing.output
    missing = CliRunner().invoke(cli, ["bench", "search", "--base", str(tmp_path / "none.yaml")])
    assert missing.exit_code != 0
    unknown_arm = CliRunner().invoke(cli, ["bench", "search", "--arm", "simplex", "--results-dir", str(tmp_path)])
    assert unknown_arm.exit_code == 2 and "no arm ['simplex']" in unknown_arm.output
    assert not any(tmp_path.iterdir())
    assert runner.available() == list(runner.ORDER)


def test_bench_is_a_plugin_command_that_runs_from_any_directory(tmp_path):
    from puzzle_core.registry import get_registries

    entry = get_registries().commands.entry("bench")
    assert (entry.plugin, entry.distribution) == ("bench", "puzzle-nas")
    listing = subprocess.run([sys.executable, "-m", "puzzle_core.cli", "bench", "--list"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "search" in listing.stdout and "arms: mip-1.25x, greedy-1.25x, max_params-1.25x" in listing.stdout


def test_bench_without_a_checkout_says_so(tmp_path):
    from puzzle_plugins.bench_command import benchmarks_runner

    with pytest.raises(UserError, match="benchmarks/ folder of a source checkout.*pip install -e"):
        benchmarks_runner(tmp_path / "benchmarks")


ACME_EXECUTOR = """
    from puzzle_core.api import Executor, ExecutorPlugin, hookimpl

    class Acme(Executor):
        def __init__(self, options):
            pass

        def run(self, jobs, work, description="jobs", context=None):
            for job in jobs:
                work(job)

    @hookimpl
    def puzzle_executors():
        return [ExecutorPlugin(name="acme", implementation=Acme)]
"""


def test_upgrading_a_plugin_redoes_the_stages_it_produced_and_no_others(tmp_path, counting_stages, site_packages):
    from puzzle_core.plugins import reset_plugin_manager
    from puzzle_core.registry import reset_registries

    site_packages.install("acme-executor", {"acme": ACME_EXECUTOR}, version="1.0")
    run = tmp_path / "run"
    first = run_pipeline(config(gkd={"executor": "acme"}), run, echo=lambda _: None)
    assert first.outcomes == {"first": "ran", "second": "ran"}
    site_packages.uninstall("acme-executor")
    site_packages.install("acme-executor", {"acme": ACME_EXECUTOR}, version="1.1")
    reset_plugin_manager()
    reset_registries()
    upgraded = run_pipeline(config(gkd={"executor": "acme"}), run, echo=lambda _: None)
    assert upgraded.outcomes == {"first": "skipped", "second": "ran"}  # only the gkd section picks the plugin
    assert first.hashes["first"] == upgraded.hashes["first"] and first.hashes["second"] != upgraded.hashes["second"]


def test_an_arm_records_its_main_childs_numbers_from_its_run_directory(tiny_run):
    arm = structure({"name": "base"}, runner.Arm)
    planned = runner.PlannedArm(arm, structure(read_yaml(TINY), PuzzleConfig), tiny_run.root)
    result = runner.arm_result(planned, "ok", None, {"search": "ran"}, 1.0)
    summary = json.loads((tiny_run.root / "report" / "summary.json").read_text())  # read here without the layout
    solutions = json.loads((tiny_run.root / "solutions" / "index.json").read_text())
    main = next(child for child in summary["children"] if child["main"])
    assert result["child"]["name"] == main["name"] == solutions["solutions"][0]["name"]
    assert result["child"]["objective_value"] == solutions["solutions"][0]["objective_value"]
    assert result["metrics"]["predicted_speedup"] == main["predicted_speedup"]
    assert result["metrics"]["after_gkd"] == main["eval"] and result["metrics"]["assembled"] == main["eval_before_gkd"]
    assert result["parent"] == summary["parent"] and result["stages"]["search"] == "ran"
    assert runner.arm_result(planned, "failed", "boom", {}, 1.0)["child"] is None


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_tree_state_names_uncommitted_changes_outside_the_results(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name in ("code.py", "benchmarks/results/search.json"):
        (tmp_path / name).write_text("1")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "start")
    clean = runner.tree_state(tmp_path)
    assert clean["git_dirty"] is False and len(clean["git_commit"]) == 40
    (tmp_path / "benchmarks/results/search.json").write_text("2")  # a result being rewritten is not a change
    (tmp_path / "scratch.txt").write_text("untracked")
    assert runner.tree_state(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("2")
    assert runner.tree_state(tmp_path) == {"git_commit": clean["git_commit"], "git_dirty": True,
                                           "git_changes": ["code.py"]}


def test_bench_refuses_a_changed_tree_unless_allowed(tmp_path, monkeypatch):
    from puzzle_core.cli import cli

    monkeypatch.setattr(runner, "tree_state", lambda: {"git_commit": "abc", "git_dirty": True,
                                                        "git_changes": ["plugins/search_mip.py"]})
    refused = CliRunner().invoke(cli, ["bench", "search", "--results-dir", str(tmp_path)])
    assert refused.exit_code == 2
    assert "uncommitted changes (plugins/search_mip.py)" in refused.output and "--allow-dirty" in refused.output
    assert not list(tmp_path.iterdir()), "nothing written"


def test_a_rerun_keeps_how_and_at_which_commit_each_arm_was_made(tmp_path, monkeypatch):
    from puzzle_core.pipeline import STAGE_NAMES

    def skipped_again(item, reuse, ablation, echo):
        return {"name": item.arm.name, "status": "ok", "error": None, "config_hash": item.config_hash,
                "stages": dict.fromkeys(STAGE_NAMES, "skipped"), "seconds": 0.1, "child": None, "metrics": None,
                "parent": None, "run_dir": str(item.run_dir)}

    monkeypatch.setattr(runner, "tree_state", lambda: {"git_commit": "new", "git_dirty": False, "git_changes": []})
    monkeypatch.setattr(runner, "run_arm", skipped_again)
    planned = runner.plan(runner.load_ablation("search"), "small", TINY, tmp_path)
    made = [{**skipped_again(p, [], "search", None), "stages": dict.fromkeys(STAGE_NAMES, "ran"), "seconds": 60.0}
            for p in planned]
    made[0]["git_commit"] = "first"  # the others predate per-arm commits: the results' own commit stands for them
    (tmp_path / "search.small.json").write_text(json.dumps({"environment": {"git_commit": "old"}, "arms": made}))
    runner.run_ablation("search", results_dir=tmp_path, arms=[p.arm.name for p in planned[:-1]], echo=print)
    arms = json.loads((tmp_path / "search.small.json").read_text())["arms"]
    assert [arm["git_commit"] for arm in arms] == ["first"] + ["old"] * (len(planned) - 1)
    assert all(arm["seconds"] == 60.0 and set(arm["stages"].values()) == {"ran"} for arm in arms)

    fresh = tmp_path / "fresh"  # no earlier results: the arms --arm leaves out are listed as not run
    runner.run_ablation("search", results_dir=fresh, arms=[planned[0].arm.name], echo=print)
    arms = json.loads((fresh / "search.small.json").read_text())["arms"]
    assert [arm["name"] for arm in arms] == [p.arm.name for p in planned]
    assert [arm["status"] for arm in arms] == ["ok"] + ["not run"] * (len(planned) - 1)
    assert "| greedy-1.25x | – |" in (fresh / "search.small.md").read_text()
    assert json.loads((fresh / "search.small.json").read_text())["command"].startswith(
        "puzzle bench search --budget small --arm mip-1.25x")
