"""The run report: a summary of parent and children, three plots, and a markdown page.

Everything here reads the run directory's JSON artifacts only (no model is loaded), so
a report can be re-rendered anywhere from a copied run directory:

- ``children/index.json`` (assemble): each child's solver, blocks, parameters, predicted speedup;
- ``eval/results.json`` (evaluate): every model's metrics, before and after GKD;
- ``gkd/index.json`` + ``gkd/<child>/log.json`` (gkd): KL before/after and the curves;
- ``costs/costs.json`` + ``library/index.json``: per-block runtimes, for the layer map;
- ``solutions/index.json`` (search): which solutions are the main ones.

**Accuracy preserved** is child / parent, averaged over the accuracy-like metrics of the
evaluation tasks, one metric per task: a metric named ``<task>.<metric>`` counts when
``<metric>`` is one of :data:`ACCURACY_METRICS`, and a task reporting several uses the
first in that order (``acc_norm`` before ``acc``: length-normalised answer-text
log-likelihood is the better-behaved MMLU score for small models). Perplexities, KL and
throughput are not accuracies and never count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from puzzle_core.blocks import BlockSpec
from puzzle_core.library import layer_key
from puzzle_core.library_view import layer_blocks
from puzzle_core.rundir import RunDir

ACCURACY_METRICS = ("acc_norm", "acc", "exact_match", "accuracy", "mc2", "mc1", "f1")
THROUGHPUT = "throughput_tok_s"
KL = "kl_to_parent"
REPORT_DIR = "report"


def _read(run_dir: RunDir, *parts: str) -> Any:
    path = run_dir.path(*parts)
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- metrics


def task_accuracies(metrics: Mapping[str, float]) -> dict[str, tuple[str, float]]:
    """``{task: (metric name, value)}``: one accuracy-like metric per task (see the module doc)."""
    by_task: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        task, dot, metric = name.rpartition(".")
        if dot and metric in ACCURACY_METRICS and value is not None and math.isfinite(value):
            by_task.setdefault(task, {})[metric] = value
    return {
        task: next((f"{task}.{m}", found[m]) for m in ACCURACY_METRICS if m in found)
        for task, found in sorted(by_task.items())
    }


def accuracy_preserved(child: Mapping[str, float], parent: Mapping[str, float]) -> float | None:
    """Mean over tasks of child accuracy / parent accuracy; ``None`` without a shared accuracy task."""
    ours, theirs = task_accuracies(child), task_accuracies(parent)
    ratios = [ours[t][1] / theirs[t][1] for t in ours if t in theirs and theirs[t][1] > 0]
    return sum(ratios) / len(ratios) if ratios else None


def mean_accuracy(metrics: Mapping[str, float]) -> float | None:
    values = [value for _, value in task_accuracies(metrics).values()]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- summary


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def build_summary(run_dir: RunDir, scenario: Mapping[str, Any] | None = None) -> dict:
    """``summary.json``: parent, children (with before/after GKD), scenario, and how to read them."""
    children = (_read(run_dir, "children", "index.json") or {}).get("children", [])
    evaluations = (_read(run_dir, "eval", "results.json") or {}).get("models", {})
    gkd = {entry["child"]: entry for entry in (_read(run_dir, "gkd", "index.json") or {}).get("children", [])}
    solutions = {e["name"]: e for e in (_read(run_dir, "solutions", "index.json") or {}).get("solutions", [])}
    costs = _read(run_dir, "costs", "costs.json") or {}

    parent_eval = evaluations.get("parent", {})
    parent_metrics = parent_eval.get("metrics", {})
    parent_throughput = parent_metrics.get(THROUGHPUT)
    entries = []
    for child in children:
        name = child["name"]
        assembled = evaluations.get(name, {}).get("metrics", {})
        after = evaluations.get(name + "+gkd", {}).get("metrics")
        final = after if after is not None else assembled
        throughput = final.get(THROUGHPUT, assembled.get(THROUGHPUT))
        trained = gkd.get(name)
        entries.append(
            {
                "name": name,
                "solver": child["solver"],
                "main": solutions.get(name, {}).get("main"),
                "blocks": child["blocks"],
                "params": child["params"],
                "predicted_speedup": child.get("predicted_speedup"),
                "measured_speedup": final.get("measured_speedup", _ratio(throughput, parent_throughput)),
                "throughput_tok_s": throughput,
                "kl_to_parent": final.get(KL),
                "kl_to_parent_before_gkd": assembled.get(KL),
                "kl_to_parent_after_gkd": after.get(KL) if after is not None else None,
                "accuracy_preserved": accuracy_preserved(final, parent_metrics),
                "accuracy_preserved_before_gkd": accuracy_preserved(assembled, parent_metrics),
                "eval": final,
                "eval_before_gkd": assembled,
                "gkd": None
                if trained is None
                else {
                    "steps": trained["steps"],
                    "tokens": trained["tokens"],
                    "lora_rank": trained["lora_rank"],
                    "validation_kl_before": trained["kl_before"],
                    "validation_kl_after": trained["kl_after"],
                    "tokens_per_second": trained["tokens_per_second"],
                },
            }
        )
    return {
        "parent": {
            "params": parent_eval.get("params"),
            "throughput_tok_s": parent_throughput,
            "eval": parent_metrics,
        },
        "children": entries,
        "scenario": dict(scenario if scenario is not None else costs.get("scenario", {})),
        "cost_model": costs.get("cost_model"),
        "accuracy_metrics": [metric for metric, _ in task_accuracies(parent_metrics).values()],
        "notes": {
            "measured_speedup": "median over rounds of parent time / child time, the two run alternately by the "
            "evaluate stage (its spread is in eval.measured_speedup_q1/_q3/_min/_max)",
            "predicted_speedup": "parent runtime / child runtime under the cost model",
            "kl_to_parent": "mean per-token KL(parent || child) on the test split, after GKD when it ran",
            "accuracy_preserved": "child / parent averaged over eval tasks, one accuracy-like metric per task "
            f"(first of {', '.join(ACCURACY_METRICS)})",
        },
    }


# ---------------------------------------------------------------- layer map data


def _sub_runtime(layer_costs: Mapping[str, Mapping], part: str, variant: str) -> float | None:
    """Runtime of one sub-block, from block costs: ``rt(variant + x) - rt(no-op + x)`` for a shared partner ``x``.

    Exact for cost models that add up sub-block costs (the roofline ones); for measured
    costs it is the measured difference. ``None`` when the library offers no such pair.
    """
    noop = "attn_noop" if part == "attention" else "ffn_noop"
    if variant == noop:
        return 0.0
    runtimes: dict[tuple[str, str], float] = {}
    for block_id, record in layer_costs.items():
        if "runtime_ms" in record:
            spec = BlockSpec.parse(block_id)
            runtimes[(spec.attention.id, spec.ffn.id)] = record["runtime_ms"]
    for (attention, ffn), runtime in runtimes.items():
        mine, partner = (attention, ffn) if part == "attention" else (ffn, attention)
        if mine != variant:
            continue
        empty = runtimes.get((noop, partner) if part == "attention" else (partner, noop))
        if empty is not None:
            return max(0.0, runtime - empty)
    return None


def layer_map(run_dir: RunDir, blocks: Sequence[str]) -> list[dict]:
    """Per layer of a child: each sub-block's variant and runtime relative to the parent's.

    Falls back to the whole block's relative runtime when the library has no pair to
    separate attention from FFN; the relative runtimes are ``None`` when the run has no costs.
    """
    costs = (_read(run_dir, "costs", "costs.json") or {}).get("layers", {})
    index = _read(run_dir, "library", "index.json")
    parents = [ids[0] for ids in layer_blocks(index)] if index else [None] * len(blocks)  # parent block first
    rows = []
    for i, block_id in enumerate(blocks):
        spec, layer_costs = BlockSpec.parse(block_id), costs.get(layer_key(i), {})
        parent_id = parents[i]
        whole = None
        if parent_id and block_id in layer_costs and parent_id in layer_costs:
            whole = _ratio(layer_costs[block_id].get("runtime_ms"), layer_costs[parent_id].get("runtime_ms"))
        row = {"layer": i, "block": block_id}
        parent_spec = BlockSpec.parse(parent_id) if parent_id else None
        for part, variant, parent_variant in (
            ("attention", spec.attention.id, parent_spec.attention.id if parent_spec else None),
            ("ffn", spec.ffn.id, parent_spec.ffn.id if parent_spec else None),
        ):
            relative = None
            if parent_variant is not None:
                relative = _ratio(_sub_runtime(layer_costs, part, variant), _sub_runtime(layer_costs, part, parent_variant))
            row[part] = {"variant": variant, "relative_runtime": relative if relative is not None else whole}
        rows.append(row)
    return rows


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    from puzzle_core.rundir import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(figure)
    return path


MARKERS = {"mip": "o", "greedy": "s", "max_params": "^"}


def _pareto(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both throughput (higher) and quality."""
    front = []
    best = math.inf if lower_is_better else -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if (y < best) if lower_is_better else (y > best):
            front.append((x, y))
            best = y
    return sorted(front)


def plot_frontier(summary: Mapping, path: Path) -> Path:
    """Quality (KL to the parent; accuracy when measured) against throughput, before and after GKD.

    A child's architecture does not change in GKD, so both of its points sit at its final
    throughput measurement and the arrow between them shows what GKD did to quality.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    parent = summary["parent"]
    measured = parent.get("throughput_tok_s") is not None
    base = parent.get("throughput_tok_s") if measured else 1.0

    def x_of(child):
        if measured:
            return child.get("throughput_tok_s")
        return child.get("predicted_speedup")

    panels = [("KL to parent (lower is better)", lambda m: m.get(KL), True, 0.0)]
    if mean_accuracy(parent["eval"]) is not None:
        panels.append(("mean task accuracy (higher is better)", mean_accuracy, False, mean_accuracy(parent["eval"])))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 2.4, 4.4), squeeze=False)
    handles = [Line2D([], [], marker="*", color="black", markersize=13, linestyle="none", label="parent")]
    for axis, (label, value_of, lower, parent_value) in zip(axes[0], panels):
        points = [(base, parent_value)]
        axis.scatter([base], [parent_value], marker="*", s=220, color="black", zorder=5)
        for number, child in enumerate(summary["children"]):
            x = x_of(child)
            if x is None:
                continue
            color, marker = f"C{number % 10}", MARKERS.get(child["solver"], "D")
            before = value_of(child["eval_before_gkd"])
            after = value_of(child["eval"]) if child["gkd"] else None
            if before is not None:
                axis.scatter([x], [before], marker=marker, s=70, facecolors="none", edgecolors=color, linewidths=1.6)
                points.append((x, before))
            if after is not None:
                axis.scatter([x], [after], marker=marker, s=70, color=color)
                if before is not None:
                    axis.annotate("", xy=(x, after), xytext=(x, before),
                                  arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
                points.append((x, after))
            if axis is axes[0][0]:
                handles.append(Line2D([], [], marker=marker, color=color, linestyle="none", markersize=8,
                                      label=child["name"] if child["name"] == child["solver"]
                                      else f"{child['name']} ({child['solver']})"))
        front = _pareto(points, lower)
        if len(front) > 1:
            axis.plot(*zip(*front), linestyle="--", color="grey", linewidth=1, zorder=1)
        axis.set_xlabel("measured throughput (tokens/s)" if measured else "predicted speedup (x parent)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    handles += [
        Line2D([], [], marker="o", markerfacecolor="none", color="grey", linestyle="none", label="as assembled"),
        Line2D([], [], marker="o", color="grey", linestyle="none", label="after GKD"),
        Line2D([], [], color="grey", linestyle="--", label="frontier"),
    ]
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    scenario = summary.get("scenario") or {}
    if scenario:
        figure.suptitle(
            f"Quality vs throughput — scenario: batch {scenario.get('batch_size')}, prefill {scenario.get('prefill_len')}, "
            f"decode {scenario.get('decode_len')}, {scenario.get('device')}",
            fontsize=10,
        )
    figure.tight_layout()
    return _save(figure, path)


def _short(variant: str) -> str:
    """A cell label: ``attn_g3`` -> ``g3``, ``ffn_768`` -> ``768``, linear -> ``lin``, no-op -> ``–``."""
    if variant.endswith("_noop"):
        return "–"
    if variant.endswith("_linear"):
        return "lin"
    return variant.split("_", 1)[1]


def plot_layer_map(rows_by_child: Mapping[str, list[dict]], path: Path) -> Path:
    """Per child, the chosen attention and FFN variant of every layer, coloured by relative runtime (paper Fig. 6)."""
    import numpy as np
    from matplotlib.colors import Normalize

    plt = _pyplot()
    names = list(rows_by_child)
    layers = max((len(rows) for rows in rows_by_child.values()), default=0)
    values = np.full((2 * len(names), layers), np.nan)
    labels = [["" for _ in range(layers)] for _ in range(2 * len(names))]
    for c, name in enumerate(names):
        for row in rows_by_child[name]:
            for offset, part in enumerate(("attention", "ffn")):
                relative = row[part]["relative_runtime"]
                values[2 * c + offset, row["layer"]] = np.nan if relative is None else relative
                labels[2 * c + offset][row["layer"]] = _short(row[part]["variant"])
    top = max(1.0, float(np.nanmax(values)) if np.isfinite(values).any() else 1.0)
    figure, axis = plt.subplots(figsize=(max(7.0, 0.42 * layers + 2.5), 0.62 * len(values) + 1.6))
    colormap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = axis.imshow(np.ma.masked_invalid(values), cmap=colormap, norm=Normalize(0.0, top), aspect="auto")
    for r, row_labels in enumerate(labels):
        for col, text in enumerate(row_labels):
            value = values[r, col]
            dark = np.isfinite(value) and value < 0.55 * top
            axis.text(col, r, text, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    axis.set_yticks(range(len(values)), [f"{n} · {part}" for n in names for part in ("attn", "ffn")], fontsize=8)
    axis.set_xticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
    axis.set_xlabel("layer")
    for c in range(1, len(names)):
        axis.axhline(2 * c - 0.5, color="white", linewidth=3)
    bar = figure.colorbar(image, ax=axis, fraction=0.025, pad=0.01)
    bar.set_label("runtime / parent sub-block", fontsize=8)
    axis.set_title("Chosen variants per layer (g<N>: N query heads per KV head; numbers: FFN width; lin: linear; –: no-op)",
                   fontsize=9)
    return _save(figure, path)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (same length as ``values``)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_gkd(curves: Mapping[str, Any], path: Path) -> Path:
    """Training objective and validation KL against tokens, one line per uptrained child."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for number, (name, log) in enumerate(curves.items()):
        color = f"C{number % 10}"
        if log["train"]:
            tokens, losses = [p["tokens"] for p in log["train"]], [p["loss"] for p in log["train"]]
            if len(losses) > 20:  # noisy per-step values, faint, under a moving average
                left.plot(tokens, losses, color=color, linewidth=0.6, alpha=0.3)
                losses = _moving_average(losses, max(2, len(losses) // 20))
            left.plot(tokens, losses, color=color, label=name, linewidth=1.2)
        right.plot([p["tokens"] for p in log["validation"]], [p["kl"] for p in log["validation"]], color=color,
                   marker="o", markersize=3, label=name)
    left.set_title("GKD training objective", fontsize=10)
    right.set_title("validation KL to parent", fontsize=10)
    for axis in (left, right):
        axis.set_xlabel("training tokens")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("weighted loss")
    right.set_ylabel("KL(parent || child), nats/token")
    return _save(figure, path)


# ---------------------------------------------------------------- markdown


def _fmt(value: Any, spec: str = ".4g", suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:{spec}}{suffix}"


def _millions(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(summary: Mapping, parent_source: str, plots: Mapping[str, str]) -> str:
    """The human-readable report; ``plots`` maps plot kind to its file name next to the report."""
    parent, children, scenario = summary["parent"], summary["children"], summary["scenario"]
    out = [
        "# Puzzle run report",
        "",
        f"**Parent:** `{parent_source}` — {_millions(parent['params'])} parameters, "
        f"{_fmt(parent['throughput_tok_s'], '.1f', ' tokens/s')} measured.",
        "",
        "**Scenario:** " + (", ".join(f"{k} = {v}" for k, v in scenario.items()) or "–")
        + (f"; cost model `{summary['cost_model']}`." if summary.get("cost_model") else "."),
        "",
        "## Children",
        "",
    ]
    if not children:
        out += ["No child was assembled.", ""]
    else:
        out += [
            _table(
                ["child", "solver", "params", "predicted speedup", "measured speedup", "KL before GKD",
                 "KL after GKD", "accuracy preserved"],
                [
                    [
                        f"`{c['name']}`" + (" (main)" if c.get("main") else ""),
                        c["solver"],
                        _millions(c["params"]),
                        _fmt(c["predicted_speedup"], ".2f", "x"),
                        _fmt(c["measured_speedup"], ".2f", "x"),
                        _fmt(c["kl_to_parent_before_gkd"]),
                        _fmt(c["kl_to_parent_after_gkd"]),
                        _fmt(None if c["accuracy_preserved"] is None else 100 * c["accuracy_preserved"], ".1f", "%"),
                    ]
                    for c in children
                ],
            ),
            "",
            "KL is the mean per-token KL(parent || child) on the test split. Accuracy preserved is child / parent "
            "averaged over the evaluation tasks, one accuracy-like metric per task"
            + (f" ({', '.join(summary['accuracy_metrics'])})" if summary["accuracy_metrics"] else
               " (none was measured: add the `lm_eval` evaluator)")
            + "; after GKD when GKD ran.",
            "",
        ]
    metric_names = sorted({*parent["eval"], *(m for c in children for m in (*c["eval"], *c["eval_before_gkd"]))})
    if metric_names:
        rows = [["parent", *(_fmt(parent["eval"].get(m)) for m in metric_names)]]
        for c in children:
            rows.append([f"{c['name']}", *(_fmt(c["eval_before_gkd"].get(m)) for m in metric_names)])
            if c["gkd"]:
                rows.append([f"{c['name']} + GKD", *(_fmt(c["eval"].get(m)) for m in metric_names)])
        out += ["## Evaluation", "", _table(["model", *metric_names], rows), ""]
    if plots.get("frontier"):
        out += ["## Quality vs throughput", "",
                "Parent (star) and children (hollow: as assembled; filled: after GKD), by solver; the dashed line "
                "joins the points nothing else beats on both axes.", "",
                f"![frontier]({plots['frontier']})", ""]
    if plots.get("layer_map"):
        out += ["## Chosen blocks", "",
                "Each child's attention and FFN variant per layer, coloured by runtime relative to the parent's "
                "sub-block under the cost model (the paper's Figure 6).", "",
                f"![layer map]({plots['layer_map']})", ""]
    trained = [c for c in children if c["gkd"]]
    if trained:
        out += [
            "## Global distillation (GKD)",
            "",
            _table(
                ["child", "steps", "tokens", "LoRA rank", "validation KL before", "validation KL after", "tokens/s"],
                [
                    [c["name"], str(c["gkd"]["steps"]), str(c["gkd"]["tokens"]), str(c["gkd"]["lora_rank"] or "full"),
                     _fmt(c["gkd"]["validation_kl_before"]), _fmt(c["gkd"]["validation_kl_after"]),
                     _fmt(c["gkd"]["tokens_per_second"], ".0f")]
                    for c in trained
                ],
            ),
            "",
        ]
        if plots.get("gkd"):
            out += [f"![GKD curves]({plots['gkd']})", ""]
    else:
        out += ["## Global distillation (GKD)", "", "GKD did not run in this run (`gkd.enabled: false`).", ""]
    if children:
        out += ["## Blocks of each child", ""]
        for c in children:
            out += [f"- `{c['name']}`: " + ", ".join(f"{i}:`{b}`" for i, b in enumerate(c["blocks"]))]
        out += [""]
    return "\n".join(out)
