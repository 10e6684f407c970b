"""Benchmark: what GKD tokens buy. Finished runs that uptrain the same child for different ``gkd.tokens``.

Each run is a ``puzzle run`` directory whose main child went through GKD and the
evaluation suite; all must hold the same child (the same blocks). Runs may differ in the
learning rate too (``gkd.lr``, recorded per row). Per run: the GKD validation KL curve (``gkd/<child>/log.json``), its training time and rate, the child's
KL to the parent on the test split and its accuracy preserved and chance-adjusted after
GKD (``report/summary.json``), and its suite accuracy paired item by item with the run
that trained the fewest tokens (the lowest rate among those), over the tasks where the parent beats chance. Writes
``results/gkd_tokens.json``; ``benchmarks/levers.py`` renders it.

    .venv/bin/python benchmarks/gkd_tokens.py RUN_DIR RUN_DIR [...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Sequence

from puzzle_core import layout
from puzzle_core.errors import UserError
from puzzle_core.report import model_items, paired_accuracy, tasks_above_chance
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gkd_tokens.json"
SUMMARY_KEYS = ("predicted_speedup", "measured_speedup", "kl_to_parent_before_gkd", "kl_to_parent_after_gkd",
                "accuracy_preserved_before_gkd", "accuracy_preserved_chance_adjusted_before_gkd",
                "accuracy_preserved", "accuracy_preserved_chance_adjusted")


def _required(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path} is missing: {what}. Pass run directories whose pipeline finished "
                        f"(`puzzle run CONFIG --run-dir DIR` with GKD enabled and the lm_eval evaluator).")
    return path


def _read(path: Path, what: str) -> dict:
    return json.loads(_required(path, what).read_text())


def main_child(run_dir: Path) -> dict:
    """The run's main child as its report summarises it, with the run's config and the child's GKD log and result."""
    summary = _read(run_dir / layout.SUMMARY, "the run's report summary")
    child = next((c for c in summary["children"] if c.get("main")), None)
    if child is None or child.get("kl_to_parent_after_gkd") is None:
        raise UserError(f"{run_dir}: its main child has no GKD result; run it with gkd.enabled: true.")
    gkd_dir = run_dir / layout.GKD / child["name"]
    config = load_config(_required(run_dir / layout.CONFIG, "the run's resolved config"))
    return {**child, "config": config, "log": _read(gkd_dir / "log.json", "the GKD log"),
            "result": _read(gkd_dir / "result.json", "the GKD result")}


def portable(path: Path) -> str:
    """A run directory as given when relative, else relative to the checkout, else its name: no machine folders."""
    if not path.is_absolute():
        return str(path)
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path.name


def paired_with_first(children: Sequence[tuple[Path, dict]]) -> tuple[set[str], list[dict | None]]:
    """The tasks where the first run's parent beats chance, and on them each run's main child after GKD paired
    item by item with the first run's (:func:`~puzzle_core.report.paired_accuracy`)."""
    first_run, first = children[0]
    above = tasks_above_chance(model_items(RunDir(first_run), "parent"))

    def items(run: Path, child: dict) -> dict:
        return model_items(RunDir(run), layout.uptrained(child["name"]), above)

    reference = items(first_run, first)
    return above, [paired_accuracy(reference, items(run, child)) for run, child in children]


def compare(runs: Sequence[Path]) -> dict:
    children = sorted(((run, main_child(run)) for run in runs),
                      key=lambda pair: (pair[1]["result"]["tokens"], pair[1]["config"].gkd.lr))
    blocks = {tuple(child["blocks"]) for _, child in children}
    if len(blocks) != 1:
        raise UserError("The runs uptrain different children (their main children's blocks differ), so their GKD "
                        "budgets cannot be compared. Pass runs that share the stages up to `assemble` "
                        "(`puzzle run ... --reuse FIRST_RUN --set gkd.tokens=N`).")
    reference = children[0][1]

    def row(run: Path, child: dict, paired: dict | None) -> dict:
        result = child["result"]
        return {"tokens": result["tokens"], "lr": child["config"].gkd.lr, "steps": result["steps"],
                "train_seconds": result["train_seconds"], "tokens_per_second": result["tokens_per_second"],
                "validation": child["log"]["validation"],
                "vs_fewest_tokens": None if paired is None else {**paired["mean"], "tasks": sorted(paired["tasks"])}}

    above, rows = rows_with_pairs(children, row)
    return {"child": {"name": reference["name"], "blocks": reference["blocks"], "params": reference["params"]},
            "tasks_above_chance": sorted(above), "rows": rows}


def rows_with_pairs(children: Sequence[tuple[Path, dict]],
                    row: Callable[[Path, dict, dict | None], dict]) -> tuple[set[str], list[dict]]:
    """The tasks where the first run's parent beats chance, and per run: its directory, ``row(run, child, paired)``
    (``paired``: the child's suite against the first run's child, :func:`paired_with_first`) and the child's
    report numbers (``SUMMARY_KEYS``)."""
    above, pairs = paired_with_first(children)
    return above, [{"run": portable(run), **row(run, child, paired), **{key: child.get(key) for key in SUMMARY_KEYS}}
                   for (run, child), paired in zip(children, pairs)]


def run_comparison(argv: Sequence[str] | None, compare: Callable[[Sequence[Path]], dict], table: Callable[[dict], None],
                   description: str, runs_help: str, out: Path, command: str) -> int:
    """A comparison script's ``main``: parse ``RUN... [--out FILE]``, compare the runs, write the results with the
    machine and command, and print ``table(results)``. Exit code 2 after printing the error when the runs cannot be
    compared."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path, help=runs_help)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args(argv)
    try:
        results = compare(args.runs)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    table(write_results(results, args.runs, args.out, command))
    print(f"\nWrote {args.out}")
    return 0


def write_results(results: dict, runs: Sequence[Path], out: Path, command: str) -> dict:
    """``results`` with the machine and the command (``command`` and the runs) that made them, written to ``out``."""
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
               "command": f"{command} " + " ".join(portable(run) for run in runs), **results}
    atomic_write_json(out, results)
    return results


def table(results: dict) -> None:
    print(f"{'tokens':>9}{'GKD min':>9}{'val KL':>9}{'test KL':>9}{'preserved':>11}{'chance-adj':>12}{'vs fewest':>11}")
    for row in results["rows"]:
        versus = row["vs_fewest_tokens"]
        print(f"{row['tokens']:>9}{row['train_seconds'] / 60:>9.1f}{row['validation'][-1]['kl']:>9.3f}"
              f"{row['kl_to_parent_after_gkd']:>9.3f}{row['accuracy_preserved']['value']:>11.1%}"
              f"{row['accuracy_preserved_chance_adjusted']['value']:>12.1%}"
              f"{'' if versus is None else format(versus['difference']['value'] * 100, '+.1f'):>11}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_comparison(argv, compare, table, __doc__.split("\n\n")[0],
                          "finished run directories, one per GKD budget", OUT, "benchmarks/gkd_tokens.py")


if __name__ == "__main__":
    sys.exit(main())
