"""Search benchmark: MIP speed and quality on Puzzle-sized random libraries.

Instances: 80 layers x 50 variants, three constraints (runtime, memory, parameters) at
50% of the parent's totals; scores and costs are random but correlated the way real
libraries are (cheaper variants lose more, some layers are more sensitive than others).

Measured on each instance:
- ``mip`` (python-mip / CBC) at gap 1e-3: wall time (model building included) and status;
- ``mip`` at gap 1e-4 with a 10 s limit: the proven gap it reaches;
- the same two runs with scipy's HiGHS ``milp``, on the same matrices;
- objective of ``mip``, ``greedy`` and ``max_params`` (solution quality).

Usage: ``python benchmarks/search.py [--instances 8] [--threads 1]``; prints tables and
writes ``benchmarks/results/search.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mip
import numpy as np
import scipy
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from puzzle_core.library import BlockLibrary
from puzzle_core.search import SearchProblem, build_problem
from puzzle_plugins.greedy_solver import GreedyOptions, GreedySolver
from puzzle_plugins.mip_solver import MaxParamsSolver, MipOptions, MipSolver

LAYERS, VARIANTS = 80, 50
COSTS = ("stats.runtime_ms", "stats.memory_mib", "stats.num_params")
BUDGET_FRACTION = 0.5
RESULTS = Path(__file__).parent / "results" / "search.json"


def random_library(seed: int) -> BlockLibrary:
    """A parent (variant 0) and cheaper variants per layer with correlated costs and KL."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(LAYERS):
        sensitivity = rng.lognormal(0.0, 0.8)
        runtime, memory, params = rng.uniform(8, 12), rng.uniform(80, 120), rng.uniform(0.8e8, 1.2e8)
        size = np.concatenate([[1.0], rng.uniform(0.02, 1.0, VARIANTS - 1)])  # fraction of the parent block kept
        compute = np.clip(size * rng.normal(1.0, 0.1, VARIANTS), 0.01, 1.2)  # runtime tracks size, with noise
        weights = np.clip(0.6 * size + 0.4 * rng.uniform(0, 1, VARIANTS), 0.01, 1.0)  # memory / params: looser
        kl = sensitivity * (1.0 - size) ** 1.5 * rng.lognormal(0.0, 0.3, VARIANTS)
        compute[0] = weights[0] = 1.0
        kl[0] = 0.0
        records.append(
            {
                f"v{j}": {
                    "stats": {
                        "runtime_ms": float(runtime * compute[j]),
                        "memory_mib": float(memory * weights[j]),
                        "num_params": float(round(params * weights[j] * rng.uniform(0.95, 1.05))),
                    },
                    "metrics": {"kl": float(kl[j])},
                }
                for j in range(VARIANTS)
            }
        )
    return BlockLibrary(records)


def instance(seed: int) -> SearchProblem:
    """A random library with budgets at ``BUDGET_FRACTION`` of the parent's totals."""
    library = random_library(seed)
    parent = [library.variants(i)[0] for i in range(library.num_layers)]
    budgets = [
        f"{path}<={BUDGET_FRACTION * sum(library.get(i, n, path) for i, n in enumerate(parent))!r}" for path in COSTS
    ]
    return build_problem(library, "metrics.kl", constraints=budgets)


def highs(problem: SearchProblem, gap: float, time_limit: float) -> dict:
    """The same 0/1 program with scipy's HiGHS ``milp`` (which runs HiGHS on one thread)."""
    started = time.perf_counter()
    mask = problem.mask.ravel()
    columns = np.flatnonzero(mask)
    rows = np.repeat(np.arange(problem.num_layers), mask.reshape(problem.num_layers, -1).sum(axis=1))
    one_per_layer = csr_matrix((np.ones(len(columns)), (rows, np.arange(len(columns)))), shape=(problem.num_layers, len(columns)))
    costs = np.stack([problem.values(c.path, cost=True).ravel()[columns] for c in problem.constraints])
    high = [problem.bounds(c)[1] for c in problem.constraints]
    result = milp(
        c=problem.scores().ravel()[columns],
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(costs, -np.inf, high)],
        options={"mip_rel_gap": gap, "time_limit": time_limit, "disp": False},
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "status": {0: "optimal", 1: "time_limit"}.get(result.status, f"status {result.status}"),
        "gap": float(result.mip_gap) if result.x is not None else None,
        "objective": float(result.fun) if result.x is not None else None,
    }


def cbc(problem: SearchProblem, gap: float, time_limit: float, threads: int) -> dict:
    started = time.perf_counter()
    (solution,) = MipSolver(MipOptions(gap=gap, time_limit=time_limit, threads=threads)).solve(problem)
    return {
        "seconds": time.perf_counter() - started,
        "solve_seconds": solution.solve_seconds,
        "status": solution.status,
        "gap": solution.gap,
        "objective": solution.objective_value,
    }


def run_instance(seed: int, threads: int) -> dict:
    problem = instance(seed)
    result = {
        "seed": seed,
        "cbc_1e-3": cbc(problem, 1e-3, 60.0, threads),
        "cbc_1e-4_10s": cbc(problem, 1e-4, 10.0, threads),
        "highs_1e-3": highs(problem, 1e-3, 60.0),
        "highs_1e-4_10s": highs(problem, 1e-4, 10.0),
    }
    started = time.perf_counter()
    (greedy,) = GreedySolver(GreedyOptions()).solve(problem)
    greedy_seconds = time.perf_counter() - started
    (max_params,) = MaxParamsSolver(MipOptions(gap=1e-3, threads=threads)).solve(problem)
    result["quality"] = {
        "mip": result["cbc_1e-3"]["objective"],
        "greedy": greedy.objective_value,
        "greedy_seconds": greedy_seconds,
        "max_params": max_params.objective_value,
        "parent": problem.objective_value(problem.parent),
    }
    return result


def summarise(runs: list[dict]) -> dict:
    def median(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in runs)

    def worst(key: str, field: str) -> float:
        return max(r[key][field] for r in runs)

    summary = {}
    for key in ("cbc_1e-3", "cbc_1e-4_10s", "highs_1e-3", "highs_1e-4_10s"):
        summary[key] = {
            "median_seconds": median(key, "seconds"),
            "max_seconds": worst(key, "seconds"),
            "median_gap": median(key, "gap"),
            "max_gap": worst(key, "gap"),
            "optimal": sum(r[key]["status"] == "optimal" for r in runs),
        }
    for solver in ("mip", "greedy", "max_params"):
        summary[f"quality_{solver}"] = {
            "median_objective": statistics.median(r["quality"][solver] for r in runs),
            "median_ratio_to_mip": statistics.median(r["quality"][solver] / r["quality"]["mip"] for r in runs),
        }
    return summary


def print_tables(runs: list[dict], summary: dict) -> None:
    print(f"\nMIP on {LAYERS} layers x {VARIANTS} variants, {len(COSTS)} constraints at {BUDGET_FRACTION:.0%} of the "
          f"parent, {len(runs)} instances")
    print(f"{'run':<18} {'median s':>9} {'max s':>8} {'median gap':>11} {'max gap':>9} {'optimal':>8}")
    for key, label in (("cbc_1e-3", "CBC gap 1e-3"), ("highs_1e-3", "HiGHS gap 1e-3"),
                       ("cbc_1e-4_10s", "CBC 1e-4, 10 s"), ("highs_1e-4_10s", "HiGHS 1e-4, 10 s")):
        s = summary[key]
        print(f"{label:<18} {s['median_seconds']:>9.2f} {s['max_seconds']:>8.2f} {s['median_gap']:>11.2e} "
              f"{s['max_gap']:>9.2e} {s['optimal']:>5}/{len(runs)}")
    print("\nSolution quality (summed KL, lower is better)")
    print(f"{'solver':<12} {'median objective':>17} {'median x MIP':>13}")
    for solver in ("mip", "greedy", "max_params"):
        q = summary[f"quality_{solver}"]
        print(f"{solver:<12} {q['median_objective']:>17.3f} {q['median_ratio_to_mip']:>13.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    mip.Model(solver_name=mip.CBC)  # loads the CBC library once (~0.5 s), outside the timings
    load_before = os.getloadavg()
    runs = []
    for seed in range(args.instances):
        runs.append(run_instance(seed, args.threads))
        r = runs[-1]
        print(
            f"instance {seed}: CBC {r['cbc_1e-3']['seconds']:.2f}s, HiGHS {r['highs_1e-3']['seconds']:.2f}s; "
            f"gap@10s CBC {r['cbc_1e-4_10s']['gap']:.1e} HiGHS {r['highs_1e-4_10s']['gap']:.1e}",
            file=sys.stderr,
        )
    summary = summarise(runs)
    print_tables(runs, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from puzzle_core.rundir import atomic_write_json

    atomic_write_json(
        args.out,
        {
            "config": {"layers": LAYERS, "variants": VARIANTS, "constraints": list(COSTS),
                       "budget_fraction": BUDGET_FRACTION, "instances": args.instances, "threads": args.threads},
            "environment": {"python": platform.python_version(), "scipy": scipy.__version__, "cpus": os.cpu_count(),
                            "load_average_before": load_before, "load_average_after": os.getloadavg()},
            "summary": summary,
            "runs": runs,
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
