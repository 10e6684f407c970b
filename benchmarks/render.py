"""Ablation results as markdown tables and PNG plots, and the README section that gathers them.

``puzzle bench`` writes each ablation's table (``<name>.md``), bar plot (``<name>.png``) and,
when its arms are solvers at several budgets (``mip-1.25x``, ``mip-1.5x``, ...), a frontier
plot (``<name>.frontier.png``) next to its results JSON. This script rewrites the "Ablation
results" section of ``benchmarks/README.md`` from the committed results: every table, with
the hand-written finding for the ablation (``<name>.finding.md`` next to the JSON) under it.

    .venv/bin/python benchmarks/render.py            # rewrite the section
    .venv/bin/python benchmarks/render.py --check    # exit 1 if the README differs from the results
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from puzzle_core import report
from puzzle_core.report import percent_interval
from puzzle_core.rundir import atomic_path, atomic_write

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ablations"
README = HERE / "README.md"
START, END = "<!-- ablations:start -->", "<!-- ablations:end -->"
# `all` runs them in this order: shared work first
ORDER = ("search", "baselines", "frontier", "search_text", "search_objective", "gkd_uptraining", "scoring", "search_space",
         "gkd_losses", "bld")
BUDGETED_ARM = re.compile(r"(?P<method>.+)-(?P<speedup>\d+(?:\.\d+)?)x")  # mip-1.25x: method mip at 1.25x


def final_metric(arm: Mapping, name: str) -> float | None:
    """An arm's evaluator number after GKD (as assembled when GKD did not run)."""
    metrics = arm.get("metrics") or {}
    value = (metrics.get("after_gkd") or metrics.get("assembled") or {}).get(name)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if abs(value) < 1e-2 or abs(value) >= 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _assembled(arm: Mapping, name: str) -> float | None:
    return ((arm.get("metrics") or {}).get("assembled") or {}).get(name)


def _speedup_spread(arm: Mapping) -> str:
    """The measured speedup's median over paired rounds with its interquartile range."""
    value = final_metric(arm, "measured_speedup")
    low, high = final_metric(arm, "measured_speedup_q1"), final_metric(arm, "measured_speedup_q3")
    if value is None:
        return "–"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if low is not None and high is not None else f"{value:.2f}"


def markdown_table(results: Mapping) -> str:
    """One row per arm: speedups, KL to the parent, accuracy preserved (vs the parent, the reference arm and, for
    ``METHOD-Bx`` arms, the reference method's arm at the same budget).

    The after-GKD columns appear when some arm ran GKD; the accuracy columns when the suite ran.
    """
    reference = results["reference"]
    comparison = results.get("comparison") or {}
    ratios = comparison.get("kl_to_parent_vs_reference", {})
    versus = comparison.get("accuracy_vs_reference") or {}
    same_budget = comparison.get("accuracy_vs_same_budget") or {}
    same_budget = same_budget if any(same_budget.values()) else {}  # no arm has a counterpart that was evaluated
    method = BUDGETED_ARM.fullmatch(reference)
    arms = results["arms"]
    trained = any((a.get("metrics") or {}).get("after_gkd") for a in arms)
    accuracy = any((a.get("metrics") or {}).get("accuracy_preserved_before_gkd") for a in arms)
    headers = ["arm", "solver", "predicted speedup", "measured speedup [IQR]", "KL assembled"]
    headers += ["KL after GKD"] if trained else []
    headers += [f"KL vs {reference}"]
    if accuracy:
        headers += ["accuracy preserved assembled", "chance-adjusted assembled"]
        headers += ["accuracy preserved after GKD", "chance-adjusted after GKD"] if trained else []
        headers += [f"accuracy vs {reference}, points (tasks above chance)" if versus else None]
        headers += [f"accuracy vs {method['method']} at the same budget, points" if same_budget else None]
    headers = [h for h in headers if h]
    headers += ["params", "status"]
    rows = []
    for arm in arms:
        metrics = arm.get("metrics") or {}
        child = arm.get("child") or {}
        ran_gkd = bool(metrics.get("after_gkd"))
        row = [arm["name"], child.get("solver", "–"), _number(metrics.get("predicted_speedup")), _speedup_spread(arm),
               _number(_assembled(arm, "kl_to_parent"))]
        row += [_number(final_metric(arm, "kl_to_parent")) if ran_gkd else "–"] if trained else []
        row += [f"{ratios[arm['name']]:.2f}x" if ratios.get(arm["name"]) else "–"]
        if accuracy:
            row += [percent_interval(metrics.get("accuracy_preserved_before_gkd")),
                    percent_interval(metrics.get("accuracy_preserved_chance_adjusted_before_gkd"))]
            if trained:
                row += [percent_interval(metrics.get("accuracy_preserved")) if ran_gkd else "–",
                        percent_interval(metrics.get("accuracy_preserved_chance_adjusted")) if ran_gkd else "–"]
            for compared in (versus, same_budget):
                if compared:
                    mean = compared.get(arm["name"])
                    row += ["–" if mean is None else percent_interval(mean["difference"], signed=True)]
        row += [_number(metrics.get("params")), arm["status"] + (f" ({arm['note']})" if arm.get("note") else "")]
        rows.append(row)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pooled_line(results: Mapping) -> str:
    """Each method against the reference method, paired at equal budgets and pooled over them ("" when none)."""
    pooled = (results.get("comparison") or {}).get("pooled_vs_same_budget") or {}
    method = BUDGETED_ARM.fullmatch(results["reference"])
    if not pooled or method is None:
        return ""
    parts = [f"{name} {percent_interval(found['difference'], signed=True)} points at "
             f"{', '.join(found['budgets'])} ({found['items']:,} item pairs)" for name, found in pooled.items()]
    return (f"Against {method['method']} at the same budget, pooled over the budgets both reached (paired, tasks "
            f"above chance, each task at each budget one term of the mean): " + "; ".join(parts) + ".")


def pairs_lines(results: Mapping) -> str:
    """The ablation's own pairs of methods, each at every budget both reached and pooled ("" when none ran)."""
    lines = []
    for pair in (results.get("comparison") or {}).get("pairs") or []:
        if pair["pooled"] is None:
            continue
        budgets = [f"{BUDGETED_ARM.fullmatch(name)['speedup']}x {percent_interval(found['difference'], signed=True)}"
                   for name, found in pair["per_arm"].items()]
        lines.append(f"- {pair['method']} against {pair['against']}, points: {'; '.join(budgets)}; pooled "
                     f"{percent_interval(pair['pooled']['difference'], signed=True)} "
                     f"({pair['pooled']['items']:,} item pairs).")
    if not lines:
        return ""
    return ("Pairs of methods at the same budget (paired item by item, tasks above chance; pooled: each task at each "
            "budget one term of the mean):\n\n") + "\n".join(lines)


def parent_line(results: Mapping) -> str:
    """The parent's own numbers (from the reference arm's run, else the first that has them)."""
    arms = sorted(results["arms"], key=lambda a: a["name"] != results["reference"])
    parent = next((a["parent"] for a in arms if a.get("parent")), None)
    if parent is None:
        return ""
    evaluation = parent.get("eval", {})
    parts = [f"{_number(parent.get('params'))} params", f"{_number(parent.get('throughput_tok_s'))} tok/s measured"]
    if evaluation.get("measured_speedup_min") is not None:
        parts.append(f"paired with itself {evaluation['measured_speedup']:.3f}x (range "
                     f"{evaluation['measured_speedup_min']:.3f}-{evaluation['measured_speedup_max']:.3f}: the "
                     f"timing noise)")
    tasks = parent.get("accuracy") or {}
    if tasks:
        accuracies = ", ".join(f"{task} {100 * entry['accuracy']['value']:.1f}" for task, entry in tasks.items())
        parts.append(f"accuracy % ({len(tasks)} tasks, {min(e['items'] for e in tasks.values())}+ items each): "
                     f"{accuracies}")
    if "test_lm_loss" in evaluation:
        parts.append(f"test LM loss {_number(evaluation['test_lm_loss'])}")
    return "Parent: " + ", ".join(parts) + "."


def provenance(results: Mapping) -> str:
    """The command, machine, versions and commit; loud when the tree had uncommitted changes."""
    env = results["environment"]
    minutes = sum(a.get("seconds") or 0 for a in results["arms"]) / 60
    line = (f"Command: `{results['command']}` on {env['base_config']}; {minutes:.1f} min of arm time; "
            f"{env['device']} ({env['cpu']}, {env['cpu_count']} cores, load {env['load_average'][0]:.1f}), threads "
            f"{env['threads']}, seeds {env['seeds']}, torch {env['packages'].get('torch')}, commit "
            f"{str(env.get('git_commit'))[:10]}.")
    commits = sorted({str(a["git_commit"])[:10] for a in results["arms"] if a.get("git_commit")} -
                     {str(env.get("git_commit"))[:10]})
    if commits:
        line += f" Arms made at earlier commits, reused unchanged: {', '.join(commits)}."
    if env.get("git_dirty"):
        changed = ", ".join(env.get("git_changes") or []) or "unknown files"
        line = (f"**From a checkout with uncommitted changes ({changed}; `--allow-dirty`): these numbers match no "
                f"commit.**\n\n" + line)
    return line


def ablation_markdown(results: Mapping, level: int = 3, frontier: str | None = None) -> str:
    """An ablation's heading, description, table, parent line, errors and provenance."""
    env = results["environment"]
    errors = [f"- `{a['name']}` {a['status']}: {a['error']}" for a in results["arms"] if a.get("error")]
    return "\n\n".join(
        part
        for part in [
            f"{'#' * level} Ablation `{results['ablation']}` ({env['budget']} budget)",
            results["description"].strip(),
            f"Paper: {results['paper'].strip()}" if results.get("paper") else "",
            markdown_table(results),
            pooled_line(results),
            pairs_lines(results),
            f"![{results['ablation']} frontier]({frontier})" if frontier else "",
            parent_line(results),
            "\n".join(errors),
            provenance(results),
        ]
        if part
    )


def write_markdown(results: Mapping, path: Path) -> None:
    atomic_write(path, ablation_markdown(results) + "\n")


def frontier_points(results: Mapping) -> dict[str, list[Mapping]]:
    """Arms named ``METHOD-SPEEDUPx`` grouped by method, each group in budget order; only methods with 2+ points."""
    groups: dict[str, list[tuple[float, Mapping]]] = {}
    for arm in results["arms"]:
        match = BUDGETED_ARM.fullmatch(arm["name"])
        if match and arm.get("metrics"):
            groups.setdefault(match["method"], []).append((float(match["speedup"]), arm))
    return {method: [arm for _, arm in sorted(points, key=lambda p: p[0])]
            for method, points in groups.items() if len(points) > 1}


def _percent_arrays(intervals: list[Mapping | None]):
    """Value, low and high of each interval in percent, NaN where not measured or unbounded."""
    import numpy as np

    return tuple(np.array([100 * found[part] if found and found.get(part) is not None else np.nan
                           for found in intervals]) for part in ("value", "low", "high"))


def save(figure, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_frontier(results: Mapping, path: Path) -> bool:
    """Quality against measured speedup, one line per method (False, and no file, when no method has 2+ budgets).

    Left: chance-adjusted accuracy preserved (mean over tasks, paired 95% interval); right:
    KL to the parent (log scale). Horizontal bars: the measured speedup's interquartile range.
    Where GKD ran, each method's children after GKD are the solid line and the same children
    as assembled a faint dashed one, so the plot shows what uptraining bought each method.
    """
    groups = frontier_points(results)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (accuracy, kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (method, arms) in enumerate(groups.items()):
        x = np.array([final_metric(a, "measured_speedup") or np.nan for a in arms])
        xerr = np.nan_to_num([x - [final_metric(a, "measured_speedup_q1") or np.nan for a in arms],
                              [final_metric(a, "measured_speedup_q3") or np.nan for a in arms] - x])
        phases = [("", "_before_gkd", "assembled")]
        if any(a["metrics"].get("after_gkd") for a in arms):
            phases = [(" assembled", "_before_gkd", "assembled"), (" after GKD", "", "after_gkd")]
        for label, suffix, phase in phases:
            faint = len(phases) > 1 and phase == "assembled"
            style = {"color": f"C{index}", "marker": "o", "capsize": 3, "label": method + label,
                     "linestyle": "--" if faint else "-", "alpha": 0.45 if faint else 1.0}
            y, low, high = _percent_arrays([a["metrics"].get(f"accuracy_preserved_chance_adjusted{suffix}")
                                            for a in arms])
            accuracy.errorbar(x, y, xerr=xerr, yerr=np.nan_to_num([y - low, high - y]), **style)
            kl.errorbar(x, [(a["metrics"].get(phase) or {}).get("kl_to_parent") or np.nan for a in arms], xerr=xerr,
                        **style)
    accuracy.axhline(100.0, color="grey", linewidth=0.8)
    accuracy.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    accuracy.set_ylabel("chance-adjusted accuracy preserved, %\n(mean over tasks, paired 95% CI)")
    accuracy.set_title("accuracy (higher is better)")
    kl.set_yscale("log")
    kl.set_ylabel("KL(parent || child) per token, test split")
    kl.set_title("KL to the parent (lower is better)")
    for axis in (accuracy, kl):
        axis.set_xlabel("measured speedup over the parent (median, IQR)")
        axis.legend(fontsize=8)
    save(figure, path, f"{results['ablation']} ({results['environment']['budget']} budget): quality vs speed")
    return True


def write_plot(results: Mapping, path: Path) -> None:
    """Per arm: KL to the parent (assembled and after GKD, log scale), accuracy preserved with its 95% interval
    (when measured), and predicted and measured speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = [a for a in results["arms"] if a.get("metrics")]
    names = [a["name"] for a in arms]
    x = np.arange(len(arms))
    measured = any(a["metrics"].get("accuracy_preserved_before_gkd") for a in arms)
    figure, axes = plt.subplots(1, 3 if measured else 2, figsize=(max(8, 1.6 * len(arms) + 4) * (1.4 if measured else 1), 4.2))
    quality, speed = axes[0], axes[-1]
    phases = [("assembled", "_before_gkd", lambda a: True), ("after GKD", "", lambda a: bool(a["metrics"].get("after_gkd")))]
    for offset, (label, suffix, ran) in zip((-0.2, 0.2), phases):
        values = [(_assembled(a, "kl_to_parent") if suffix else final_metric(a, "kl_to_parent")) if ran(a) else None
                  for a in arms]
        quality.bar(x + offset, [v if v else np.nan for v in values], width=0.4, label=label)
        if measured:
            value, low, high = _percent_arrays([a["metrics"].get("accuracy_preserved" + suffix) if ran(a) else None
                                                for a in arms])
            axes[1].bar(x + offset, value, width=0.4, label=label,
                        yerr=np.nan_to_num([value - low, high - value]), capsize=3)
    quality.set_yscale("log")
    quality.set_ylabel("KL(parent || child) per token, test split")
    quality.set_title("quality (lower is better)")
    if measured:
        axes[1].axhline(100.0, color="grey", linewidth=0.8)
        axes[1].set_ylabel("accuracy preserved, % (mean over tasks, 95% CI)")
        axes[1].set_title("accuracy (higher is better)")
    speeds = [("predicted", "predicted_speedup"), ("measured", "measured_speedup")]
    for offset, (label, key) in zip((-0.2, 0.2), speeds):
        speed.bar(x + offset, [a["metrics"].get(key) or np.nan for a in arms], width=0.4, label=label)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_ylabel("speedup over the parent")
    speed.set_title("speed")
    for axis in axes:
        axis.set_xticks(x, names, rotation=30, ha="right")
        axis.legend(fontsize=8)
    save(figure, path, f"{results['ablation']} ({results['environment']['budget']} budget)")


# ---------------------------------------------------------------------------- the README section


def results_path(results_dir: Path, ablation: str, budget: str) -> Path:
    """``<ablation>.json`` for the full budget, ``<ablation>.<budget>.json`` for another."""
    return results_dir / (f"{ablation}.json" if budget == "full" else f"{ablation}.{budget}.json")


def readme_section(results_dir: Path = RESULTS) -> str:
    """Every ablation at the full budget (table, frontier plot, finding), then the small budget's tables."""
    parts = ["<!-- Generated by benchmarks/render.py from benchmarks/results/ablations: rerun the ablations or edit "
             "the *.finding.md files, not this text. -->"]
    names = list(ORDER) + sorted({p.name.split(".")[0] for p in results_dir.glob("*.json")} - set(ORDER))
    for budget in ("full", "small"):
        parts.append(f"### {budget.capitalize()} budget")
        for name in names:
            path = results_path(results_dir, name, budget)
            if not path.is_file():
                parts.append(f"#### Ablation `{name}` ({budget} budget)\n\nNot run at the {budget} budget.")
                continue
            results = json.loads(path.read_text())
            frontier = path.with_suffix(".frontier.png")
            parts.append(ablation_markdown(results, level=4, frontier=(
                frontier.relative_to(README.parent).as_posix() if frontier.is_file() and
                frontier.is_relative_to(README.parent) else None)))
            finding = results_dir / f"{name}.finding.md"
            if budget == "full":
                parts.append(f"**Finding.** {finding.read_text().strip()}" if finding.is_file()
                             else "**Finding.** Not written yet.")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the ablation results JSON")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--check", action="store_true", help="only check that the README section is up to date")
    args = parser.parse_args(argv)
    return report.rewrite_section(args.readme, START, END, lambda: readme_section(args.results), "ablation results",
                                  "benchmarks/render.py", args.check)


if __name__ == "__main__":
    sys.exit(main())
