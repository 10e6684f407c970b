"""Benchmark: finished runs' main children side by side, whatever their blocks. What a config's budgets buy.

Each run is a ``puzzle run`` directory whose main child went through GKD and the evaluation
suite: a ``configs/quality.yaml`` run, the demo, an ablation arm's run directory. Per run:
the budgets that tell configs apart (the search's text and target speedup; BLD, scoring and
GKD tokens), the GKD rate, the child's parameters, predicted and measured speedup, KL to the
parent as assembled and after GKD (comparable across runs measured on the same
``evaluation.corpus``), accuracy preserved and chance-adjusted, and the suite paired item by
item with the first run's child after GKD, over the tasks where the first run's parent beats
chance (tasks whose items differ are left out). Writes ``results/compare_runs.json`` or ``--out``.

    .venv/bin/python -m benchmarks.compare_runs FIRST_RUN RUN [...] [--out FILE]    (from the checkout's root)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from benchmarks.gkd_data import corpus_label
from benchmarks.gkd_tokens import main_child, rows_with_pairs, run_comparison
from puzzle_core.config import unstructure
from puzzle_core.report import differences_by_task, percent_interval
from puzzle_core.schema import PuzzleConfig

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "compare_runs.json"


def budgets(config: PuzzleConfig) -> dict:
    """What the run's config spent and searched for."""
    return {"search_text": corpus_label(unstructure(config.data.corpus)), "target_speedup": config.search.speedup,
            "bld_tokens": config.library.tokens, "scoring_tokens": config.scoring.tokens}


def compare(runs: Sequence[Path]) -> dict:
    def row(run: Path, child: dict, paired: dict | None) -> dict:
        result = child["result"]
        return {**budgets(child["config"]), "gkd_tokens": result["tokens"], "gkd_seconds": result["train_seconds"],
                "gkd_tokens_per_second": result["tokens_per_second"],
                "child": {"name": child["name"], "blocks": child["blocks"], "params": child["params"]},
                "vs_first": differences_by_task(paired)}

    above, rows = rows_with_pairs([(run, main_child(run)) for run in runs], row)
    return {"tasks_above_chance": sorted(above), "rows": rows}


def table(results: dict) -> None:
    print(f"{'run':<28}{'target':>7}{'BLD':>8}{'score':>6}{'GKD':>9}{'params':>8}{'pred':>6}{'meas':>6}"
          f"{'KL':>13}{'preserved':>10}{'chance-adj':>11}{'vs first (95% CI)':>22}")
    for row in results["rows"]:
        versus = row["vs_first"]
        difference = "not paired" if versus is None else percent_interval(versus["difference"], signed=True)
        target = "-" if row["target_speedup"] is None else f"{row['target_speedup']:.2f}x"
        print(f"{Path(row['run']).name[:27]:<28}{target:>7}{row['bld_tokens']:>8}"
              f"{row['scoring_tokens']:>6}{row['gkd_tokens']:>9}{row['child']['params'] / 1e6:>7.1f}M"
              f"{row['predicted_speedup']:>6.2f}{row['measured_speedup']:>6.2f}"
              f"{row['kl_to_parent_before_gkd']:>6.3f} > {row['kl_to_parent_after_gkd']:.3f}"
              f"{row['accuracy_preserved']['value']:>10.1%}{row['accuracy_preserved_chance_adjusted']['value']:>11.1%}"
              f"{difference:>22}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_comparison(argv, compare, table, __doc__.split("\n\n")[0],
                          "finished run directories; the first is the reference", OUT,
                          "python -m benchmarks.compare_runs")


if __name__ == "__main__":
    sys.exit(main())
