"""Benchmark: re-evaluate an existing run's children on the evaluation suite, paired with the parent.

Does the suite rank children as their KL to the parent does? For a finished (or
partly finished) run directory, this evaluates the parent and every child folder it
holds (``children/<name>`` as assembled, ``gkd/<name>/final`` after GKD) with the
evaluators of ``--config`` (default: the demo's ``kl_to_parent`` and ``lm_eval`` suite at
its item limits; ``throughput`` is left out), on the same seeded items for every model,
and prints per child: KL to the parent, test LM loss, and accuracy preserved per task
and on the mean, with paired bootstrap 95% intervals (as ``report.md`` does), plus the
Spearman rank correlation between KL and mean accuracy preserved over the children.

    .venv/bin/python benchmarks/eval_children.py RUN_DIR [RUN_DIR ...] [--config configs/demo.yaml]
        [--children mip greedy] [--parent-items OTHER_RUN/eval/items/parent] [--name NAME]

``--parent-items`` reuses the parent's per-item scores of another run made with the same
evaluation settings (they pair only when their items' fingerprints agree) instead of
evaluating the parent again.

Several run directories (of the same parent) put their children side by side on one
yardstick: each is named ``RUN/CHILD``, the parent is evaluated once, and every child is
also paired item by item with the first one, over the tasks where the parent beats chance
(``vs_first``, in accuracy points). ``--config benchmarks/eval_resolving.yaml`` is such a
yardstick: more items of the two tasks where SmolLM2-135M is far above chance.

Per-item scores go to ``benchmarks/results/eval_children/<name>/items/<model>/`` and the
table to ``benchmarks/results/eval_children/<name>.json``; the name defaults to the run's
folder name (with several runs, ``--name`` is required).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import attrs
import torch
from scipy.stats import spearmanr

from puzzle_core.cache import cache_root
from puzzle_core.config import unstructure
from puzzle_core.corpus import load_corpus
from puzzle_core.evaluation import evaluate_all, read_task_items
from puzzle_core.interfaces import EvalContext
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.report import (
    differences_by_task, paired_accuracy, parent_accuracy, percent_interval, tasks_above_chance,
)
from puzzle_core.rundir import atomic_write_json
from puzzle_core.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "eval_children"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="evaluators, parent, corpus and threads (default: the demo's)")
    parser.add_argument("--children", nargs="+", help="only these (names as listed, e.g. mip or mip+gkd)")
    parser.add_argument("--parent-items", type=Path, help="the parent's items from a run with the same settings")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results/eval_children)")
    parser.add_argument("--name", help="the results' name (default: the run's folder name)")
    args = parser.parse_args()
    if args.name is None:
        if len(args.run_dirs) > 1:
            parser.error("name the results of several runs with --name")
        args.name = args.run_dirs[0].resolve().name
    return args


def child_folders(run_dir: Path) -> dict[str, Path]:
    """``{model: folder}``: every assembled child, then every child after GKD."""
    found = {p.name: p for p in sorted((run_dir / "children").iterdir()) if (p / "config.json").is_file()}
    found.update({f"{p.parent.name}+gkd": p for p in sorted((run_dir / "gkd").glob("*/final"))
                  if (p / "config.json").is_file()})
    return found


def all_children(run_dirs: list[Path], only: list[str] | None) -> dict[str, tuple[Path, Path]]:
    """``{model: (run directory, folder)}`` of every run's children (named ``RUN/CHILD`` when there are several
    runs), only those named in ``only`` when given."""
    found = {}
    for run_dir in run_dirs:
        for name, folder in child_folders(run_dir).items():
            if not only or name in only:
                found[name if len(run_dirs) == 1 else f"{run_dir.resolve().name}/{name}"] = (run_dir, folder)
    return found


def main() -> None:
    args = parse_args()
    config = load_config(args.config)
    registries = get_registries()
    torch.set_num_threads(config.threads)
    family, parent = load_parent(config.parent, registries)
    # KL and perplexity on the text the pipeline's evaluation measures on (evaluation.corpus, else data.corpus)
    corpus = load_corpus(attrs.evolve(config.data, corpus=config.evaluation_corpus), parent.tokenizer, config.seed,
                         registries)
    evaluators = [(c.name, registries.record(c).create(c.options)) for c in config.evaluation.evaluators
                  if c.name != "throughput"]
    out = args.out / args.name
    base = EvalContext(parent=parent, corpus=corpus, scenario=config.scenario, threads=config.threads,
                       seed=config.seed, cache_dir=cache_root() / "eval")
    children = all_children(args.run_dirs, args.children)
    models = {"parent": None, **{name: folder for name, (_, folder) in children.items()}}
    rows = {}
    if args.parent_items:
        shutil.copytree(args.parent_items, out / "items" / "parent", dirs_exist_ok=True)
    for name, folder in models.items():
        if name == "parent" and args.parent_items:
            rows[name] = {"folder": None, "metrics": {"kl_to_parent": 0.0}, "seconds": 0.0,
                          "items_from": str(Path(*args.parent_items.resolve().parts[-4:]))}  # RUN/eval/items/parent
            continue
        started = time.perf_counter()
        model = parent if folder is None else family.load_child(folder, dtype=config.parent.dtype)
        metrics = evaluate_all(model, evaluators, attrs.evolve(base, items_dir=out / "items" / name))
        rows[name] = {"folder": None if folder is None else str(folder.relative_to(children[name][0])),
                      "metrics": metrics, "seconds": time.perf_counter() - started}
        print(f"{name}: evaluated in {rows[name]['seconds']:.0f} s", flush=True)
    parent_items = read_task_items(out / "items" / "parent")
    above = tasks_above_chance(parent_items)
    first = None
    for name in children:
        items = read_task_items(out / "items" / name)
        rows[name]["accuracy"] = paired_accuracy(parent_items, items)
        if first is None:
            first = {task: found for task, found in items.items() if task in above}
        rows[name]["vs_first"] = differences_by_task(paired_accuracy(first, items))
    children = [n for n in children if rows[n]["accuracy"]]
    kl = [rows[n]["metrics"]["kl_to_parent"] for n in children]
    preserved = [rows[n]["accuracy"]["mean"]["preserved"]["value"] for n in children]
    rank = float(spearmanr(kl, preserved).statistic) if len(children) > 2 else math.nan
    rank = rank if math.isfinite(rank) else None  # undefined when either ranking is all ties

    parent_scores = parent_accuracy(parent_items)
    tasks = sorted(parent_items)
    width = max(16, *(len(name) + 2 for name in models))
    print(f"\n{'model':<{width}}{'KL':>8}{'test loss':>11}  " + "".join(f"{t:>16}" for t in tasks)
          + f"{'mean preserved':>26}{'chance-adjusted':>26}{'vs first, points':>24}")
    for name in models:
        metrics, accuracy = rows[name]["metrics"], rows[name].get("accuracy")
        field = "accuracy" if accuracy is None else "preserved"  # the parent's accuracy, a child's share of it
        cells = "".join(
            f"{percent_interval((parent_scores if accuracy is None else accuracy['tasks']).get(t, {}).get(field)):>16}"
            for t in tasks)
        mean, adjusted = ("", "") if accuracy is None else (
            percent_interval(accuracy["mean"]["preserved"]), percent_interval(accuracy["mean"]["chance_adjusted"]))
        versus = rows[name].get("vs_first")
        versus = "" if versus is None else percent_interval(versus["difference"], signed=True)
        print(f"{name:<{width}}{metrics.get('kl_to_parent', 0.0):>8.3f}"
              f"{metrics.get('test_lm_loss', float('nan')):>11.3f}  {cells}{mean:>26}{adjusted:>26}{versus:>24}")
    if rank is not None:
        print(f"\nSpearman(KL, mean accuracy preserved) over {len(children)} children: {rank:.2f} "
              f"(-1: the suite ranks them exactly as KL does)")
    atomic_write_json(out.parent / f"{out.name}.json", unstructure({
        "run_dirs": [run_dir.resolve().name for run_dir in args.run_dirs], "tasks_above_chance": sorted(above),
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
        else str(args.config), "models": rows, "spearman_kl_vs_preserved": rank}))


if __name__ == "__main__":
    main()
