"""An ablation's results as a markdown table and a PNG plot (next to its results JSON)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from puzzle_core.report import percent_interval
from puzzle_core.rundir import atomic_path, atomic_write


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


def markdown_table(results: Mapping) -> str:
    """One row per arm: speedups, KL to the parent before / after GKD (and vs the reference), accuracy preserved."""
    ratios = (results.get("comparison") or {}).get("kl_to_parent_vs_reference", {})
    accuracy = any((a.get("metrics") or {}).get("accuracy_preserved_before_gkd") for a in results["arms"])
    headers = ["arm", "solver", "predicted speedup", "measured speedup", "KL assembled", "KL after GKD",
               f"KL vs {results['reference']}"]
    if accuracy:
        headers += ["accuracy preserved assembled", "accuracy preserved after GKD", "chance-adjusted after GKD"]
    headers += ["params", "status"]
    rows = []
    for arm in results["arms"]:
        metrics = arm.get("metrics") or {}
        child = arm.get("child") or {}
        trained = bool(metrics.get("after_gkd"))
        row = [
            arm["name"],
            child.get("solver", "–"),
            _number(metrics.get("predicted_speedup")),
            _number(metrics.get("measured_speedup")),
            _number(_assembled(arm, "kl_to_parent")),
            _number(final_metric(arm, "kl_to_parent")) if trained else "–",
            f"{ratios[arm['name']]:.2f}x" if ratios.get(arm["name"]) else "–",
        ]
        if accuracy:
            row += [percent_interval(metrics.get("accuracy_preserved_before_gkd")),
                    percent_interval(metrics.get("accuracy_preserved")) if trained else "–",
                    percent_interval(metrics.get("accuracy_preserved_chance_adjusted")) if trained else "–"]
        row += [_number(metrics.get("params")), arm["status"] + (f" ({arm['note']})" if arm.get("note") else "")]
        rows.append(row)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parent_line(results: Mapping) -> str:
    """The parent's own numbers (from the reference arm's run, else the first that has them)."""
    arms = sorted(results["arms"], key=lambda a: a["name"] != results["reference"])
    parent = next((a["parent"] for a in arms if a.get("parent")), None)
    if parent is None:
        return ""
    evaluation = parent.get("eval", {})
    parts = [f"{_number(parent.get('params'))} params", f"{_number(parent.get('throughput_tok_s'))} tok/s measured"]
    tasks = parent.get("accuracy") or {}
    if tasks:
        accuracies = ", ".join(f"{task} {100 * entry['accuracy']['value']:.1f}" for task, entry in tasks.items())
        parts.append(f"accuracy % ({len(tasks)} tasks, {min(e['items'] for e in tasks.values())}+ items each): "
                     f"{accuracies}")
    if "test_lm_loss" in evaluation:
        parts.append(f"test LM loss {_number(evaluation['test_lm_loss'])}")
    return "Parent: " + ", ".join(parts) + "."


def write_markdown(results: Mapping, path: Path) -> None:
    env = results["environment"]
    errors = [f"- `{a['name']}` {a['status']}: {a['error']}" for a in results["arms"] if a.get("error")]
    text = "\n\n".join(
        part
        for part in [
            f"### Ablation `{results['ablation']}` ({env['budget']} budget)",
            results["description"].strip(),
            f"Paper: {results['paper'].strip()}" if results.get("paper") else "",
            markdown_table(results),
            parent_line(results),
            "\n".join(errors),
            f"Command: `{results['command']}` on {env['base_config']}; {env['device']} ({env['cpu']}, "
            f"{env['cpu_count']} cores, load {env['load_average'][0]:.1f}), threads {env['threads']}, seeds "
            f"{env['seeds']}, torch {env['packages'].get('torch')}, commit {str(env.get('git_commit'))[:10]}"
            f"{' (dirty)' if env.get('git_dirty') else ''}.",
        ]
        if part
    )
    atomic_write(path, text + "\n")


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
            found = [a["metrics"].get("accuracy_preserved" + suffix) if ran(a) else None for a in arms]
            value = np.array([100 * f["value"] if f and f["value"] is not None else np.nan for f in found])
            low = np.array([100 * f["low"] if f and f["low"] is not None else np.nan for f in found])
            high = np.array([100 * f["high"] if f and f["high"] is not None else np.nan for f in found])
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
    figure.suptitle(f"{results['ablation']} ({results['environment']['budget']} budget)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
