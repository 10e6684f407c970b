"""The run report: a summary of parent and children, three plots, and a markdown page.

Everything here reads the run directory's JSON artifacts only (no model is loaded), so
a report can be re-rendered anywhere from a copied run directory:

- ``children/index.json`` (assemble): each child's solver, blocks, parameters, predicted speedup;
- ``eval/results.json`` (evaluate): every model's metrics, before and after GKD;
- ``eval/items/<model>/<task>.json`` (evaluate): every item's score, for paired intervals;
- ``gkd/index.json`` + ``gkd/<child>/log.json`` (gkd): KL before/after and the curves;
- ``costs/costs.json`` + ``library/index.json``: per-block runtimes, for the layer map;
- ``solutions/index.json`` (search): which solutions are the main ones.

**Accuracy preserved** is the paper's child / parent accuracy, per task and averaged
over tasks, computed on the items both models answered, with paired bootstrap 95%
intervals and a chance-adjusted variant (:mod:`puzzle_core.stats`). A task counts when
its items were saved for the parent and the child; its score is one accuracy-like
metric, the first of :data:`ACCURACY_METRICS` it has (``acc_norm`` before ``acc``: lm-eval
defines ``acc_norm`` where answer lengths differ, and length-normalised log-likelihood is
the better-behaved score there). Perplexities, KL and throughput never count.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

from puzzle_core import layout
from puzzle_core.blocks import BlockSpec
from puzzle_core.config import unstructure
from puzzle_core.errors import UserError
from puzzle_core.evaluation import TaskItems, read_task_items
from puzzle_core.layout import ChildSummary, GKDLog, GKDSummary, ParentSummary, Summary
from puzzle_core.library import layer_key
from puzzle_core.rundir import RunDir, atomic_write
from puzzle_core.stats import PairedScores, accuracy_interval, compare_tasks

ACCURACY_METRICS = ("acc_norm", "acc", "exact_match", "accuracy", "mc2", "mc1", "f1")
THROUGHPUT = "throughput_tok_s"
KL = "kl_to_parent"


# ---------------------------------------------------------------- accuracy


def headline_metric(items: TaskItems) -> str | None:
    """The metric a task is compared on: the first of :data:`ACCURACY_METRICS` it has."""
    return next((metric for metric in ACCURACY_METRICS if metric in items.metrics), None)


def parent_accuracy(parent: Mapping[str, TaskItems]) -> dict[str, dict]:
    """Per task: the parent's accuracy with its bootstrap interval, the metric, items and chance."""
    found = {}
    for task, items in sorted(parent.items()):
        metric = headline_metric(items)
        if metric is not None:
            found[task] = {"metric": metric, "items": len(items.ids), "chance": sum(items.chance) / len(items.chance),
                           "accuracy": unstructure(accuracy_interval(items.metrics[metric]))}
    return found


def tasks_above_chance(parent: Mapping[str, TaskItems]) -> set[str]:
    """The tasks on which the parent beats chance: the only ones where a child can keep or lose accuracy."""
    return {task for task, found in parent_accuracy(parent).items() if found["accuracy"]["value"] > found["chance"]}


def paired_accuracy(parent: Mapping[str, TaskItems], child: Mapping[str, TaskItems]) -> dict | None:
    """The child against the parent on the items both answered: per task and the mean over tasks.

    Tasks whose items differ between the two (another limit, seed or data) are listed
    under ``unpaired`` and left out. ``None`` when no task pairs.
    """
    scores, metrics, unpaired = {}, {}, []
    for task in sorted(parent.keys() & child.keys()):
        ours, theirs = child[task], parent[task]
        metric = headline_metric(theirs)
        if metric is None or metric not in ours.metrics:
            continue
        if ours.ids != theirs.ids or ours.fingerprint != theirs.fingerprint:
            unpaired.append(task)
            continue
        metrics[task] = metric
        scores[task] = PairedScores(theirs.metrics[metric], ours.metrics[metric], theirs.chance)
    if not scores:
        return None
    per_task, mean = compare_tasks(scores)
    return {
        "tasks": {task: {"metric": metrics[task], **unstructure(result)} for task, result in per_task.items()},
        "mean": unstructure(mean),
        "unpaired": unpaired,
    }


def differences_by_task(paired: dict | None) -> dict | None:
    """A :func:`paired_accuracy` comparison's mean over tasks, with each task's difference only."""
    return None if paired is None else {
        **paired["mean"], "tasks": {task: found["difference"] for task, found in paired["tasks"].items()}}


def model_items(run_dir: RunDir, model: str, tasks: Collection[str] | None = None) -> dict[str, TaskItems]:
    """A model's saved suite items by task; only ``tasks`` when given (e.g. the tasks above chance)."""
    found = read_task_items(layout.eval_items_dir(run_dir, model))
    return found if tasks is None else {task: items for task, items in found.items() if task in tasks}


# ---------------------------------------------------------------- summary


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def build_summary(run_dir: RunDir, scenario: Mapping[str, Any] | None = None) -> Summary:
    """``summary.json``: parent, children (with before/after GKD), scenario, and how to read them."""
    results = layout.read_eval_results(run_dir)
    evaluations = results.models if results is not None else {}
    gkd = layout.read_gkd_results(run_dir)
    solutions = layout.read_solutions_index(run_dir)
    costs = layout.read_costs(run_dir) or layout.CostTable()

    parent_eval = evaluations.get("parent")
    parent_metrics = parent_eval.metrics if parent_eval is not None else {}
    parent_throughput = parent_metrics.get(THROUGHPUT)
    parent_items = model_items(run_dir, "parent")
    entries = []
    for child in layout.read_children(run_dir):
        name = child.name
        assembled = evaluations[name].metrics if name in evaluations else {}
        after = evaluations[layout.uptrained(name)].metrics if layout.uptrained(name) in evaluations else None
        final = after if after is not None else assembled
        throughput = final.get(THROUGHPUT, assembled.get(THROUGHPUT))
        trained = gkd.get(name)
        accuracy_before = paired_accuracy(parent_items, model_items(run_dir, name))
        accuracy = paired_accuracy(parent_items, model_items(run_dir, layout.uptrained(name))) if after is not None \
            else accuracy_before
        listed = solutions.entry(name) if solutions is not None else None
        entries.append(
            ChildSummary(
                name=name,
                solver=child.solver,
                main=listed.main if listed is not None else None,
                blocks=child.blocks,
                params=child.params,
                predicted_speedup=child.predicted_speedup,
                measured_speedup=final.get("measured_speedup", _ratio(throughput, parent_throughput)),
                throughput_tok_s=throughput,
                kl_to_parent=final.get(KL),
                kl_to_parent_before_gkd=assembled.get(KL),
                kl_to_parent_after_gkd=after.get(KL) if after is not None else None,
                accuracy_preserved=_mean_of(accuracy, "preserved"),
                accuracy_preserved_chance_adjusted=_mean_of(accuracy, "chance_adjusted"),
                accuracy_preserved_before_gkd=_mean_of(accuracy_before, "preserved"),
                accuracy_preserved_chance_adjusted_before_gkd=_mean_of(accuracy_before, "chance_adjusted"),
                accuracy=accuracy,
                accuracy_before_gkd=accuracy_before,
                eval=final,
                eval_before_gkd=assembled,
                gkd=None
                if trained is None
                else GKDSummary(
                    steps=trained.steps,
                    tokens=trained.tokens,
                    lora_rank=trained.lora_rank,
                    validation_kl_before=trained.kl_before,
                    validation_kl_after=trained.kl_after,
                    tokens_per_second=trained.tokens_per_second,
                ),
            )
        )
    accuracy = parent_accuracy(parent_items)
    return Summary(
        parent=ParentSummary(
            params=parent_eval.params if parent_eval is not None else None,
            throughput_tok_s=parent_throughput,
            accuracy=accuracy,
            eval=parent_metrics,
        ),
        children=entries,
        scenario=dict(scenario if scenario is not None else costs.scenario),
        cost_model=costs.cost_model,
        accuracy_metrics=[f"{task}.{entry['metric']}" for task, entry in accuracy.items()],
        notes={
            "measured_speedup": "median over rounds of parent time / child time, the two run alternately by the "
            "evaluate stage (its spread is in eval.measured_speedup_q1/_q3/_min/_max)",
            "predicted_speedup": "parent runtime / child runtime under the cost model",
            "kl_to_parent": "mean per-token KL(parent || child) on the test split, after GKD when it ran",
            "accuracy_preserved": "mean over tasks of child / parent accuracy on the same items, after GKD when it "
            "ran, with a paired bootstrap 95% interval (value, low, high; null bounds: unbounded); one "
            f"accuracy-like metric per task (first of {', '.join(ACCURACY_METRICS)})",
            "accuracy_preserved_chance_adjusted": "sum over tasks of (child - chance) / sum of (parent - chance), "
            "chance = mean of 1 / #choices, over the tasks where the parent beats chance: the share of the "
            "parent's above-chance accuracy the child keeps",
            "accuracy": "per task and mean: parent, child, difference, preserved, chance_adjusted, each with its "
            "paired bootstrap 95% interval",
        },
    )


def _mean_of(accuracy: Mapping | None, statistic: str) -> dict | None:
    return None if accuracy is None else accuracy["mean"][statistic]


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
    found = layout.read_costs(run_dir)
    costs = found.layers if found is not None else {}
    index = layout.read_library_index(run_dir)
    parents = index.parent_blocks() if index is not None else [None] * len(blocks)
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


MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # one per solver, in the order the children name them


def _pareto(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both throughput (higher) and quality."""
    front = []
    best = math.inf if lower_is_better else -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if (y < best) if lower_is_better else (y > best):
            front.append((x, y))
            best = y
    return sorted(front)


def plot_frontier(summary: Summary, path: Path) -> Path:
    """Quality (KL to the parent; accuracy when measured) against throughput, before and after GKD.

    A child's architecture does not change in GKD, so both of its points sit at its final
    throughput measurement and the arrow between them shows what GKD did to quality.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    measured = summary.parent.throughput_tok_s is not None
    base = summary.parent.throughput_tok_s if measured else 1.0

    def x_of(child):
        if measured:
            return child.throughput_tok_s
        return child.predicted_speedup

    def kl(key):
        return lambda child: None if getattr(child, key).get(KL) is None else (getattr(child, key)[KL], None, None)

    def preserved(key):
        def value(child):
            found = getattr(child, key)
            return None if found is None or found["value"] is None else \
                tuple(None if v is None else 100 * v for v in (found["value"], found["low"], found["high"]))
        return value

    panels = [("KL to parent (lower is better)", kl("eval_before_gkd"), kl("eval"), True, 0.0)]
    if any((c.accuracy_preserved_before_gkd or {}).get("value") is not None for c in summary.children):
        panels.append(("accuracy preserved, % (mean over tasks, 95% CI)", preserved("accuracy_preserved_before_gkd"),
                       preserved("accuracy_preserved"), False, 100.0))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 2.4, 4.4), squeeze=False)
    handles = [Line2D([], [], marker="*", color="black", markersize=13, linestyle="none", label="parent")]
    solvers = list(dict.fromkeys(child.solver for child in summary.children))
    for axis, (label, before_of, after_of, lower, parent_value) in zip(axes[0], panels):
        points = [(base, parent_value)]
        axis.scatter([base], [parent_value], marker="*", s=220, color="black", zorder=5)
        for number, child in enumerate(summary.children):
            x = x_of(child)
            if x is None:
                continue
            color, marker = f"C{number % 10}", MARKERS[solvers.index(child.solver) % len(MARKERS)]
            before = before_of(child)
            after = after_of(child) if child.gkd else None
            for found, filled in ((before, False), (after, True)):
                if found is None:
                    continue
                value, low, high = found
                if low is not None and high is not None:
                    axis.errorbar([x], [value], yerr=[[value - low], [high - value]], color=color, alpha=0.5,
                                  capsize=3, linewidth=1)
                axis.scatter([x], [value], marker=marker, s=70, color=color if filled else "none",
                             edgecolors=color, linewidths=1.6, zorder=4)
                points.append((x, value))
            if before is not None and after is not None:
                axis.annotate("", xy=(x, after[0]), xytext=(x, before[0]),
                              arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
            if axis is axes[0][0]:
                handles.append(Line2D([], [], marker=marker, color=color, linestyle="none", markersize=8,
                                      label=child.name if child.name == child.solver else f"{child.name} ({child.solver})"))
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
    scenario = summary.scenario
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


def plot_gkd(curves: Mapping[str, GKDLog], path: Path) -> Path:
    """Training objective and validation KL against tokens, one line per uptrained child."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for number, (name, log) in enumerate(curves.items()):
        color = f"C{number % 10}"
        if log.train:
            tokens, losses = [p.tokens for p in log.train], [p.loss for p in log.train]
            if len(losses) > 20:  # noisy per-step values, faint, under a moving average
                left.plot(tokens, losses, color=color, linewidth=0.6, alpha=0.3)
                losses = _moving_average(losses, max(2, len(losses) // 20))
            left.plot(tokens, losses, color=color, label=name, linewidth=1.2)
        right.plot([p.tokens for p in log.validation], [p.kl for p in log.validation], color=color,
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


def splice(text: str, start: str, end: str, body: str) -> str | None:
    """``text`` with what lies between the marker lines ``start`` and ``end`` replaced by ``body``; ``None``
    when the markers are missing (generated sections of hand-written markdown)."""
    first, last = text.find(start), text.find(end)
    if first < 0 or last < first:
        return None
    return text[: first + len(start)] + "\n" + body + text[last:]


def rewrite_section(path: Path, start: str, end: str, render: Callable[[], str], what: str, script: str,
                    check: bool = False) -> int:
    """Write (or with ``check`` only compare) the generated section of the markdown file ``path``; an exit code.

    0: written or up to date; 1: stale (``check``); 2: the markers are missing or ``render`` raised a
    :class:`UserError` (its message printed).
    """
    current = path.read_text()
    try:
        updated = splice(current, start, end, render())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return UserError.exit_code
    if updated is None:
        print(f"error: {path} has no '{start}' ... '{end}' pair: put both marker lines where the {what} section "
              f"belongs, then run {script} again.", file=sys.stderr)
        return 2
    if check:
        if updated != current:
            print(f"{path}: the {what} section is stale; run {script}", file=sys.stderr)
            return 1
        print(f"{path}: the {what} section is up to date")
        return 0
    atomic_write(path, updated)
    print(f"Wrote the {what} section of {path}")
    return 0


def percent_interval(interval: Mapping | None, signed: bool = False) -> str:
    """``98.4% [96.0, 100.9]`` (``+1.2 [...]`` points when ``signed``); ``–`` when not measured."""
    if interval is None or interval["value"] is None:
        return "–"
    spec = "+.1f" if signed else ".1f"
    value = f"{100 * interval['value']:{spec}}" + ("" if signed else "%")
    if interval["low"] is None or interval["high"] is None:
        return f"{value} [unbounded]"
    return f"{value} [{100 * interval['low']:{spec}}, {100 * interval['high']:{spec}}]"


def _comparison_rows(accuracy: Mapping) -> list[list[str]]:
    def row(label: str, entry: Mapping) -> list[str]:
        return [label, _fmt(100 * entry["parent"]["value"], ".1f"), _fmt(100 * entry["child"]["value"], ".1f"),
                percent_interval(entry["difference"], signed=True), percent_interval(entry["preserved"]),
                percent_interval(entry["chance_adjusted"])]

    rows = [row(f"{task} ({entry['metric']}, {entry['items']} items)", entry) for task, entry in accuracy["tasks"].items()]
    return rows + [row(f"**mean of {len(accuracy['tasks'])} tasks**", accuracy["mean"])]


def accuracy_section(summary: Summary) -> list[str]:
    """Parent accuracies and, per child before and after GKD, the paper's Table 2 with paired intervals."""
    parent = summary.parent.accuracy
    if not parent:
        return []
    out = ["## Accuracy", "",
           "Every model answers the same items of each task. Intervals are 95% bootstrap intervals; for a child they "
           "are paired (every replicate redraws items, both models keep their answers), and the mean over tasks "
           "redraws every task's items jointly. Difference is in accuracy points; preserved is child / parent; "
           "chance-adjusted is (child - chance) / (parent - chance), chance = 1 / #choices (over tasks: the summed "
           "margins of the tasks where the parent beats chance), so a task at chance cannot flatter a child.", "",
           _table(["task", "metric", "items", "chance", "parent accuracy (95% CI)"],
                  [[task, e["metric"], str(e["items"]), _fmt(100 * e["chance"], ".1f"),
                    percent_interval(e["accuracy"])] for task, e in parent.items()]), ""]
    header = ["task", "parent", "child", "difference, points (95% CI)", "preserved (95% CI)", "chance-adjusted (95% CI)"]
    for child in summary.children:
        for label, accuracy in (("as assembled", child.accuracy_before_gkd),
                                ("after GKD", child.accuracy if child.gkd else None)):
            if accuracy is None:
                continue
            out += [f"### `{child.name}` {label}", "", _table(header, _comparison_rows(accuracy)), ""]
            if accuracy["unpaired"]:
                out += [f"Not compared (items differ from the parent's): {', '.join(accuracy['unpaired'])}.", ""]
    return out


def render_markdown(summary: Summary, parent_source: str, plots: Mapping[str, str]) -> str:
    """The human-readable report; ``plots`` maps plot kind to its file name next to the report."""
    parent, children, scenario = summary.parent, summary.children, summary.scenario
    out = [
        "# Puzzle run report",
        "",
        f"**Parent:** `{parent_source}` — {_millions(parent.params)} parameters, "
        f"{_fmt(parent.throughput_tok_s, '.1f', ' tokens/s')} measured.",
        "",
        "**Scenario:** " + (", ".join(f"{k} = {v}" for k, v in scenario.items()) or "–")
        + (f"; cost model `{summary.cost_model}`." if summary.cost_model else "."),
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
                 "KL after GKD", "accuracy preserved (95% CI)", "chance-adjusted (95% CI)"],
                [
                    [
                        f"`{c.name}`" + (" (main)" if c.main else ""),
                        c.solver,
                        _millions(c.params),
                        _fmt(c.predicted_speedup, ".2f", "x"),
                        _fmt(c.measured_speedup, ".2f", "x"),
                        _fmt(c.kl_to_parent_before_gkd),
                        _fmt(c.kl_to_parent_after_gkd),
                        percent_interval(c.accuracy_preserved),
                        percent_interval(c.accuracy_preserved_chance_adjusted),
                    ]
                    for c in children
                ],
            ),
            "",
            "KL is the mean per-token KL(parent || child) on the test split. Accuracy preserved is child / parent "
            "accuracy, averaged over the evaluation tasks"
            + (f" ({', '.join(summary.accuracy_metrics)})" if summary.accuracy_metrics else
               " (none was measured: add the `lm_eval` evaluator)")
            + ", after GKD when GKD ran; chance-adjusted is the share of the parent's above-chance accuracy the "
            "child keeps. Intervals: paired bootstrap, 95%.",
            "",
        ]
    out += accuracy_section(summary)
    paired = {task for c in children for found in (c.accuracy, c.accuracy_before_gkd) if found
              for task in found["tasks"]} | set(parent.accuracy)
    metric_names = sorted(
        name
        for name in {*parent.eval, *(m for c in children for m in (*c.eval, *c.eval_before_gkd))}
        if name.rpartition(".")[0] not in paired  # per-task accuracies are in the Accuracy section
    )
    if metric_names:
        rows = [["parent", *(_fmt(parent.eval.get(m)) for m in metric_names)]]
        for c in children:
            rows.append([c.name, *(_fmt(c.eval_before_gkd.get(m)) for m in metric_names)])
            if c.gkd:
                rows.append([f"{c.name} + GKD", *(_fmt(c.eval.get(m)) for m in metric_names)])
        out += ["## Other measurements", "", _table(["model", *metric_names], rows), ""]
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
    trained = [c for c in children if c.gkd]
    if trained:
        out += [
            "## Global distillation (GKD)",
            "",
            _table(
                ["child", "steps", "tokens", "LoRA rank", "validation KL before", "validation KL after", "tokens/s"],
                [
                    [c.name, str(c.gkd.steps), str(c.gkd.tokens), str(c.gkd.lora_rank or "full"),
                     _fmt(c.gkd.validation_kl_before), _fmt(c.gkd.validation_kl_after),
                     _fmt(c.gkd.tokens_per_second, ".0f")]
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
            out += [f"- `{c.name}`: " + ", ".join(f"{i}:`{b}`" for i, b in enumerate(c.blocks))]
        out += [""]
    return "\n".join(out)
