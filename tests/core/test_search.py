"""Search: constraints, objectives, layer rules, and the solvers against an exhaustive reference."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puzzle_core.config import structure, unstructure
from puzzle_core.errors import PluginError, UserError
from puzzle_core.library import BlockLibrary
from puzzle_core.schema import SearchSection
from puzzle_core.search import (
    Constraint,
    InfeasibleError,
    LayerRule,
    Objective,
    Solution,
    build_problem,
    run_solver,
)
from puzzle_plugins.greedy_solver import GreedyOptions, GreedySolver
from puzzle_plugins.mip_solver import MaxParamsSolver, MipOptions, MipSolver

EXAMPLE_PLUGIN = Path(__file__).parents[2] / "examples" / "puzzle-example-plugin" / "puzzle_example_plugin" / "__init__.py"
PATHS = ("stats.runtime_ms", "stats.memory_mib")
EXACT = MipOptions(gap=0.0, time_limit=30.0)


def _example_plugin():
    spec = importlib.util.spec_from_file_location("example_plugin_under_test", EXAMPLE_PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BRUTE_FORCE = _example_plugin().BruteForceSolver(_example_plugin().BruteForceOptions())


def make_library(layers: list[list[dict]]) -> BlockLibrary:
    """Layers of variants given as ``{"kl", "runtime_ms", "memory_mib", "num_params"}``."""
    return BlockLibrary(
        [
            {
                f"v{j}": {
                    "stats": {k: v for k, v in variant.items() if k != "kl"},
                    "metrics": {"kl": variant["kl"]},
                }
                for j, variant in enumerate(variants)
            }
            for variants in layers
        ]
    )


@st.composite
def libraries(draw, max_layers: int = 4, max_variants: int = 4):
    """Small libraries with integer costs (exact comparisons) and real-valued scores."""
    num_layers = draw(st.integers(1, max_layers))
    layers = []
    for _ in range(num_layers):
        count = draw(st.integers(1, max_variants))
        layers.append(
            [
                {
                    "kl": draw(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)),
                    "runtime_ms": draw(st.integers(0, 20)),
                    "memory_mib": draw(st.integers(0, 20)),
                    "num_params": draw(st.integers(0, 1000)),
                }
                for _ in range(count)
            ]
        )
    return make_library(layers)


@st.composite
def constraints(draw, library: BlockLibrary):
    """One or two max / min / range constraints with bounds anywhere in (and a bit beyond) the reachable range."""
    chosen = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=2, unique=True))
    result = []
    for path in chosen:
        top = sum(max(record["stats"][path[6:]] for record in layer.values()) for layer in library.layers)
        kind = draw(st.sampled_from(["max", "min", "range"]))
        low = draw(st.integers(0, top + 2))
        high = draw(st.integers(low, top + 2))
        result.append(
            Constraint(path, None if kind == "max" else low, None if kind == "min" else (high if kind == "range" else low))
        )
    return result


def feasible_objectives(problem) -> list[float]:
    """Every feasible combination's objective, by enumeration."""
    values = []
    for names in itertools.product(*problem.allowed):
        if not problem.violations(names, tolerance=0.0):
            values.append(problem.objective_value(names))
    return values


def assert_feasible(problem, solution: Solution) -> None:
    names = [solution.chosen[layer] for layer in problem.layer_names]
    assert problem.violations(names, tolerance=0.0) == []
    assert solution.objective_value == pytest.approx(problem.objective_value(names))
    for constraint in problem.constraints:
        assert solution.totals[constraint.path] == pytest.approx(problem.total(constraint.path, names))


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- solvers vs exhaustive search


@SETTINGS
@given(data=st.data(), minimize=st.booleans())
def test_mip_equals_brute_force_optimum(data, minimize):
    library = data.draw(libraries())
    problem = build_problem(library, "metrics.kl", minimize=minimize, constraints=data.draw(constraints(library)))
    try:
        (reference,) = BRUTE_FORCE.solve(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            MipSolver(EXACT).solve(problem)
        assert feasible_objectives(problem) == []
        return
    (solution,) = MipSolver(EXACT).solve(problem)
    assert_feasible(problem, solution)
    assert solution.status == "optimal"
    assert solution.objective_value == pytest.approx(reference.objective_value, abs=1e-6)
    best = min(feasible_objectives(problem)) if minimize else max(feasible_objectives(problem))
    assert reference.objective_value == pytest.approx(best)


@SETTINGS
@given(data=st.data(), start=st.sampled_from(["parent", "best_score"]))
def test_greedy_is_feasible_and_never_better_than_mip(data, start):
    library = data.draw(libraries())
    problem = build_problem(library, "metrics.kl", constraints=data.draw(constraints(library)))
    greedy = GreedySolver(GreedyOptions(start=start))
    try:
        (optimum,) = MipSolver(EXACT).solve(problem)
    except InfeasibleError:
        with pytest.raises(UserError):  # infeasible, or stuck: greedy cannot prove joint infeasibility
            greedy.solve(problem)
        return
    try:
        (solution,) = greedy.solve(problem)
    except UserError as exc:  # a greedy walk may get stuck between several budgets, never on one upper bound
        assert not isinstance(exc, InfeasibleError)
        assert not (len(problem.constraints) == 1 and problem.constraints[0].min is None)
        return
    assert_feasible(problem, solution)
    assert solution.status == "feasible" and solution.gap is None
    assert solution.objective_value >= optimum.objective_value - 1e-6


def test_greedy_never_takes_a_swap_that_only_rounding_makes_useful():
    """Budget just below the parent: swapping a layer to its own variant 'saves' ~1e-16 by rounding."""
    library = BlockLibrary(
        [
            {"v0": {"stats": {"runtime_ms": cost}, "metrics": {"kl": 0.0}},
             "v1": {"stats": {"runtime_ms": cost / 2}, "metrics": {"kl": 1.0 + index}}}
            for index, cost in enumerate((0.3, 0.6, 0.3))
        ]
    )
    problem = build_problem(library, "metrics.kl", constraints=[f"stats.runtime_ms<={1.2 * (1 - 1e-7)!r}"])
    (solution,) = GreedySolver(GreedyOptions()).solve(problem)
    assert solution.chosen == {"layer_0": "v1", "layer_1": "v0", "layer_2": "v0"}


@pytest.mark.filterwarnings("ignore::puzzle_core.search.SearchWarning")  # fewer diverse solutions may exist
@SETTINGS
@given(data=st.data(), min_diversity=st.integers(1, 3))
def test_diverse_solutions_differ_pairwise_and_match_exhaustive_order(data, min_diversity):
    library = data.draw(libraries(max_layers=4, max_variants=3))
    problem = build_problem(
        library,
        "metrics.kl",
        constraints=data.draw(constraints(library)),
        num_solutions=3,
        min_diversity=min(min_diversity, library.num_layers),
    )
    try:
        reference = BRUTE_FORCE.solve(problem)
    except InfeasibleError:
        return
    solutions = MipSolver(EXACT).solve(problem)
    assert 1 <= len(solutions) <= 3
    for solution in solutions:
        assert_feasible(problem, solution)
    for first, second in itertools.combinations(solutions, 2):
        differing = sum(first.chosen[k] != second.chosen[k] for k in first.chosen)
        assert differing >= problem.min_diversity
    assert solutions[0].objective_value == pytest.approx(reference[0].objective_value, abs=1e-6)
    objectives = sorted(feasible_objectives(problem))
    if all(b - a > 1e-6 for a, b in zip(objectives, objectives[1:])):  # no ties: the sequence is unique
        assert [s.chosen for s in solutions] == [r.chosen for r in reference]


@SETTINGS
@given(data=st.data())
def test_max_params_maximises_parameters_and_reports_the_objective(data):
    library = data.draw(libraries())
    problem = build_problem(library, "metrics.kl", constraints=data.draw(constraints(library)))
    by_params = problem.with_objective(Objective.parse("stats.num_params"), minimize=False)
    try:
        (reference,) = BRUTE_FORCE.solve(by_params)
    except InfeasibleError:
        return
    (solution,) = MaxParamsSolver(EXACT).solve(problem)
    assert_feasible(problem, solution)
    assert solution.totals["stats.num_params"] == pytest.approx(reference.totals["stats.num_params"])
    assert solution.solver == "max_params"


def test_mip_regressions_found_by_fuzzing():
    """CBC's preprocessing once returned a choice over budget; its 1e-5 absolute cutoff hid small gains."""
    over_budget = BlockLibrary.from_json(
        {
            "layer_0": {"v0": {"stats": {"runtime_ms": 2, "memory_mib": 2}, "metrics": {"kl": 0.0}},
                        "v1": {"stats": {"runtime_ms": 2, "memory_mib": 3}, "metrics": {"kl": 8.8}}},
            "layer_1": {"v0": {"stats": {"runtime_ms": 5, "memory_mib": 2}, "metrics": {"kl": 1.7}}},
            "layer_2": {"v0": {"stats": {"runtime_ms": 1, "memory_mib": 3}, "metrics": {"kl": 1.9}},
                        "v1": {"stats": {"runtime_ms": 4, "memory_mib": 6}, "metrics": {"kl": 8.0}},
                        "v2": {"stats": {"runtime_ms": 0, "memory_mib": 2}, "metrics": {"kl": 1e-05}},
                        "v3": {"stats": {"runtime_ms": 3, "memory_mib": 0}, "metrics": {"kl": 7.5}}},
        }
    )
    problem = build_problem(over_budget, "metrics.kl", minimize=False, constraints=["stats.runtime_ms<=9", "5<=stats.memory_mib<=5"])
    with pytest.raises(InfeasibleError):
        MipSolver(EXACT).solve(problem)
    small_gain = make_library(
        [
            [dict(kl=7.5, runtime_ms=3, memory_mib=0, num_params=0), dict(kl=5.5, runtime_ms=5, memory_mib=0, num_params=0)],
            [dict(kl=8.2, runtime_ms=0, memory_mib=0, num_params=0), dict(kl=1e-5, runtime_ms=2, memory_mib=0, num_params=0),
             dict(kl=0.0, runtime_ms=3, memory_mib=0, num_params=0)],
        ]
    )
    problem = build_problem(small_gain, "metrics.kl", minimize=False, constraints=["stats.runtime_ms>=7"])
    (solution,) = MipSolver(EXACT).solve(problem)
    assert solution.chosen == {"layer_0": "v1", "layer_1": "v1"}  # 5.5 + 1e-5 beats 5.5 + 0


def test_weighted_objective_is_optimised_as_a_sum():
    library = make_library(
        [
            [dict(kl=0.0, runtime_ms=10, memory_mib=5, num_params=9), dict(kl=1.0, runtime_ms=4, memory_mib=5, num_params=3)],
            [dict(kl=0.0, runtime_ms=10, memory_mib=5, num_params=9), dict(kl=0.2, runtime_ms=5, memory_mib=5, num_params=3)],
        ]
    )
    for layer in library.layers:  # a second metric that prefers the other variants
        for index, record in enumerate(layer.values()):
            record["metrics"]["lm_loss"] = 3.0 if index == 0 else 0.0
    problem = build_problem(library, "metrics.kl + 0.5*metrics.lm_loss", constraints=["stats.runtime_ms<=20"])
    (solution,) = MipSolver(EXACT).solve(problem)
    (reference,) = BRUTE_FORCE.solve(problem)
    assert solution.chosen == reference.chosen == {"layer_0": "v1", "layer_1": "v1"}
    assert solution.objective_value == pytest.approx(1.2)


# ---------------------------------------------------------------- ranges, targets, fixed costs


def _ladder(num_layers: int = 3) -> BlockLibrary:
    """Per layer: the parent (runtime 10, kl 0) and cheaper variants with growing kl."""
    return make_library(
        [
            [dict(kl=k, runtime_ms=r, memory_mib=r * 10, num_params=r * 100) for k, r in ((0.0, 10), (0.1, 7), (0.5, 4), (2.0, 1))]
            for _ in range(num_layers)
        ]
    )


def test_min_max_range_keeps_the_total_inside():
    problem = build_problem(_ladder(), "metrics.kl", constraints=["12<=stats.runtime_ms<=14"])
    for solver in (MipSolver(EXACT), BRUTE_FORCE, GreedySolver(GreedyOptions())):
        (solution,) = solver.solve(problem)
        assert 12 <= solution.totals["stats.runtime_ms"] <= 14
    (solution,) = MipSolver(EXACT).solve(problem)
    assert solution.chosen == {"layer_0": "v2", "layer_1": "v2", "layer_2": "v2"}  # 4 + 4 + 4, kl 1.5
    assert solution.objective_value == pytest.approx(1.5)


def test_lower_bound_alone_is_respected_when_maximising_cost():
    problem = build_problem(_ladder(), "metrics.kl", minimize=False, constraints=["stats.runtime_ms>=25"])
    (solution,) = MipSolver(EXACT).solve(problem)
    assert solution.totals["stats.runtime_ms"] >= 25


def test_speedup_and_throughput_targets_become_runtime_budgets_net_of_fixed_costs():
    library = _ladder()
    fixed = {"runtime_ms": 6.0, "memory_mib": 100.0}
    scenario = {"batch_size": 2, "prefill_len": 16, "decode_len": 8}
    problem = build_problem(library, "metrics.kl", speedup=2.0, fixed=fixed)
    (constraint,) = problem.constraints
    assert constraint.max == pytest.approx((30 + 6) / 2)  # whole-model runtime, fixed included
    assert problem.bounds(constraint) == (None, pytest.approx(18 - 6))
    problem = build_problem(library, "metrics.kl", constraints=["throughput>=1000 tokens/s"], fixed=fixed, scenario=scenario)
    assert problem.constraints[0].max == pytest.approx(1000 * 2 * 8 / 1000)  # 16 generated tokens at 1000 tok/s
    (solution,) = MipSolver(EXACT).solve(problem)
    assert solution.totals["stats.runtime_ms"] <= 16
    assert solution.totals["stats.memory_mib"] >= 100  # fixed costs are in every total
    problem = build_problem(library, "metrics.kl", constraints=["speedup in (1.5, 2)"])
    assert (problem.constraints[0].min, problem.constraints[0].max) == (pytest.approx(15), pytest.approx(20))


def test_throughput_needs_a_scenario():
    with pytest.raises(UserError, match="scenario"):
        build_problem(_ladder(), "metrics.kl", constraints=["throughput>=100"])


# ---------------------------------------------------------------- infeasibility and validation


def test_infeasible_error_states_what_each_constraint_can_reach():
    problem = build_problem(_ladder(), "metrics.kl", constraints=["stats.runtime_ms<=2", "stats.memory_mib<=1000"])
    with pytest.raises(InfeasibleError) as raised:
        MipSolver(EXACT).solve(problem)
    message = str(raised.value)
    assert "stats.runtime_ms<=2: the smallest achievable total is 3, so it can never hold" in message
    assert "stats.memory_mib<=1000: the smallest achievable total is 30" in message
    jointly = build_problem(_ladder(), "metrics.kl", constraints=["stats.runtime_ms<=3", "stats.num_params>=900"])
    for solver in (MipSolver(EXACT), BRUTE_FORCE):
        with pytest.raises(InfeasibleError, match="each constraint can hold on its own, but not all together"):
            solver.solve(jointly)
    with pytest.raises(UserError, match="greedy got stuck"):  # greedy cannot prove joint infeasibility
        GreedySolver(GreedyOptions()).solve(jointly)
    with pytest.raises(InfeasibleError, match="can never hold"):  # but it can spot a constraint that never holds
        GreedySolver(GreedyOptions()).solve(problem)


def test_library_values_are_validated_for_the_paths_used():
    library = _ladder()
    del library.layers[1]["v2"]["metrics"]["kl"]
    with pytest.raises(UserError, match=r"layer_1\.v2 has no value at 'metrics\.kl'"):
        build_problem(library, "metrics.kl")
    library = _ladder()
    library.layers[0]["v1"]["stats"]["runtime_ms"] = -1.0
    with pytest.raises(UserError, match="negative cost"):
        build_problem(library, "metrics.kl", constraints=["stats.runtime_ms<=20"])
    build_problem(library, "metrics.kl", constraints=["stats.memory_mib<=200"])  # unused paths are not checked
    with pytest.raises(UserError, match="Did you mean 'metrics.kl'"):
        build_problem(_ladder(), "metrics.kll")
    with pytest.raises(UserError, match="finite"):
        BlockLibrary.from_json({"layer_0": {"a": {"stats": {"runtime_ms": math.nan}, "metrics": {"kl": 0.0}}}})
    with pytest.raises(UserError, match="Fixed cost stats.runtime_ms"):
        build_problem(_ladder(), "metrics.kl", fixed={"runtime_ms": -2.0})
    assert build_problem(_ladder(), "metrics.kl", fixed={"runtime_ms": 2, "device": "cpu"}).fixed == {"stats.runtime_ms": 2.0}
    with pytest.raises(UserError, match="min_diversity"):
        build_problem(_ladder(), "metrics.kl", num_solutions=2, min_diversity=4)


def test_a_solver_breaking_its_contract_is_a_plugin_error():
    problem = build_problem(_ladder(), "metrics.kl", constraints=["stats.runtime_ms<=20"])

    class ParentSolver:
        def solve(self, problem):
            return [problem.solution("parent", [0] * problem.num_layers, "feasible", None, 0.0)]

    with pytest.raises(PluginError, match=r"breaks stats.runtime_ms<=20 \(total 30\)"):
        run_solver(ParentSolver(), problem, "parent")


# ---------------------------------------------------------------- layer rules


def _blocks_library() -> BlockLibrary:
    ids = ["attn_g1+ffn_64", "attn_g2+ffn_32", "attn_noop+ffn_64", "attn_g1+ffn_noop", "attn_linear+ffn_linear"]
    costs = [10, 6, 5, 5, 2]
    return BlockLibrary(
        [
            {i: {"stats": {"runtime_ms": c}, "metrics": {"kl": (10 - c) / 10}} for i, c in zip(ids, costs)}
            for _ in range(4)
        ]
    )


def test_layer_rules_restrict_the_variants_of_given_layers():
    rules = [
        LayerRule(layers=[0, -1], keep_attention=True),
        LayerRule(layers=[1], forbid=["attn_noop+*"], keep_ffn=True),
        LayerRule(layers=[2], allow=["*+ffn_noop", "attn_linear+*"]),
    ]
    problem = build_problem(_blocks_library(), "metrics.kl", constraints=["stats.runtime_ms<=8"], layer_rules=rules)
    assert problem.allowed[0] == problem.allowed[3] == ("attn_g1+ffn_64", "attn_g2+ffn_32", "attn_g1+ffn_noop")
    assert problem.allowed[1] == ("attn_g1+ffn_64", "attn_g2+ffn_32")
    assert problem.allowed[2] == ("attn_g1+ffn_noop", "attn_linear+ffn_linear")
    with pytest.raises(InfeasibleError):  # the cheapest allowed: 5 + 6 + 2 + 5 = 18 > 8
        MipSolver(EXACT).solve(problem)
    problem = build_problem(_blocks_library(), "metrics.kl", constraints=["stats.runtime_ms<=20"], layer_rules=rules)
    (solution,) = MipSolver(EXACT).solve(problem)
    assert solution.chosen["layer_0"].startswith("attn_g") and solution.chosen["layer_3"].startswith("attn_g")
    pinned = build_problem(_blocks_library(), "metrics.kl", layer_rules=[LayerRule(layers=[-2], keep_parent=True)])
    assert pinned.allowed[2] == ("attn_g1+ffn_64",)


def test_layer_rules_that_cannot_apply_are_user_errors():
    with pytest.raises(UserError, match="leaves layer_1 with no variant"):
        build_problem(_blocks_library(), "metrics.kl", layer_rules=[LayerRule(layers=[1], allow=["attn_g9*"])])
    with pytest.raises(UserError, match="names layer 7"):
        build_problem(_blocks_library(), "metrics.kl", layer_rules=[LayerRule(layers=[7], keep_attention=True)])
    with pytest.raises(UserError, match="not a block id"):
        build_problem(_ladder(), "metrics.kl", layer_rules=[LayerRule(layers=[0], keep_attention=True)])


# ---------------------------------------------------------------- parsing and config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("stats.memory_mib<=80000", Constraint("stats.memory_mib", None, 80000)),
        ("stats.runtime_ms >= 10", Constraint("stats.runtime_ms", 10, None)),
        ("10<=stats.runtime_ms<=50", Constraint("stats.runtime_ms", 10, 50)),
        ("stats.runtime_ms in (10, 50)", Constraint("stats.runtime_ms", 10, 50)),
        ("throughput>=6000 tokens/s", Constraint("throughput", 6000, None)),
        ("speedup>=1.5x", Constraint("speedup", 1.5, None)),
    ],
)
def test_constraint_syntax(text, expected):
    assert Constraint.parse(text) == expected
    assert Constraint.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text, problem", [("stats.m<<3", "not understood"), ("50<=stats.m<=10", "empty"), ("stats.m<=5 ms", "unit"),
                      ("speedup>=0", "positive")]
)
def test_bad_constraints_say_what_is_wrong(text, problem):
    with pytest.raises(UserError, match=problem):
        Constraint.parse(text)


def test_objective_syntax_round_trips():
    objective = Objective.parse("metrics.kl + 0.5*metrics.lm_loss - 2*metrics.acc")
    assert objective.terms == (("metrics.kl", 1.0), ("metrics.lm_loss", 0.5), ("metrics.acc", -2.0))
    assert Objective.parse(str(objective)) == objective
    with pytest.raises(UserError, match="weighted sum"):
        Objective.parse("metrics.kl +")


def test_search_section_accepts_strings_mappings_and_layer_rules():
    section = structure(
        {
            "objective": {"metrics.kl": 1, "metrics.lm_loss": 0.25},
            "constraints": ["stats.memory_mib<=80000", {"stats.runtime_ms": [10, 50]}, {"stats.num_params": 5e6}],
            "speedups": [1.2, 2, 3],
            "layers": [{"layers": [0, -1], "keep_attention": True}],
        },
        SearchSection,
    )
    assert section.objective.terms == (("metrics.kl", 1.0), ("metrics.lm_loss", 0.25))
    assert section.constraints[1] == Constraint("stats.runtime_ms", 10, 50)
    assert section.constraints[2] == Constraint("stats.num_params", None, 5e6)
    data = unstructure(section)
    assert data["constraints"] == ["stats.memory_mib<=80000", "10<=stats.runtime_ms<=50", "stats.num_params<=5000000"]
    assert structure(data, SearchSection) == section
    with pytest.raises(UserError, match=r"\$\.constraints\[0\].*not understood"):
        structure({"constraints": ["memory<<3"]}, SearchSection)


def test_mip_leaves_the_process_thread_count_alone():
    """CBC sets OpenMP's process-wide thread count; the stages after a search must not inherit it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        MipSolver(EXACT).solve(build_problem(_ladder(), "metrics.kl", constraints=["stats.runtime_ms<=14"]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
