"""Benchmark: what the distillation text buys. Finished runs that uptrain the same child on different ``gkd.corpus``.

Each run is a ``puzzle run`` directory whose main child went through GKD and the
evaluation suite; all hold the same child and differ in ``gkd.corpus`` (the first run is
the reference, usually the demo's own text). Per run: the text, the GKD rate, the last
validation KL (on that text's own validation split, so not comparable across texts), the
child's KL to the parent on the evaluation text's test split (the same text for every run),
accuracy preserved and chance-adjusted, and the suite paired item by item with the
reference over the tasks where the parent beats chance, per task too. Writes
``results/gkd_data.json``; ``benchmarks/levers.py`` renders it.

    .venv/bin/python -m benchmarks.gkd_data REFERENCE_RUN RUN [...]    (from the checkout's root)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from benchmarks.gkd_tokens import main_child, rows_with_pairs, run_comparison
from puzzle_core.config import unstructure
from puzzle_core.errors import UserError
from puzzle_core.report import differences_by_task, percent_interval
from puzzle_core.schema import PuzzleConfig

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gkd_data.json"


def distillation_text(config: PuzzleConfig) -> dict:
    """The text the run's GKD distilled on, as configured."""
    return unstructure(config.distillation_corpus)


def compare(runs: Sequence[Path]) -> dict:
    children = [(run, main_child(run)) for run in runs]
    if len({tuple(child["blocks"]) for _, child in children}) != 1:
        raise UserError("The runs uptrain different children (their main children's blocks differ). Pass runs that "
                        "share the stages up to `assemble` (`puzzle run ... --reuse FIRST_RUN --set gkd.corpus=...`).")
    reference = children[0][1]

    def row(run: Path, child: dict, paired: dict | None) -> dict:
        result, corpus = child["result"], distillation_text(child["config"])
        return {"corpus": corpus, "label": corpus_label(corpus), "tokens": result["tokens"],
                "train_seconds": result["train_seconds"], "tokens_per_second": result["tokens_per_second"],
                "validation": child["log"]["validation"], "vs_reference": differences_by_task(paired)}

    above, rows = rows_with_pairs(children, row)
    return {"child": {"name": reference["name"], "blocks": reference["blocks"], "params": reference["params"]},
            "tasks_above_chance": sorted(above), "rows": rows}


def corpus_label(corpus: dict) -> str:
    if corpus["name"] == "mix":
        return "+".join(part["name"] for part in corpus["corpora"])
    return corpus.get("path", corpus["name"])


def table(results: dict) -> None:
    print(f"{'text':<16}{'tokens':>9}{'tok/s':>7}{'val KL':>8}{'test KL':>9}{'preserved':>11}{'chance-adj':>12}"
          f"{'vs first (95% CI)':>24}")
    for row in results["rows"]:
        versus = percent_interval(row["vs_reference"]["difference"], signed=True)
        print(f"{row['label']:<16}{row['tokens']:>9}{row['tokens_per_second']:>7.0f}"
              f"{row['validation'][-1]['kl']:>8.3f}{row['kl_to_parent_after_gkd']:>9.3f}"
              f"{row['accuracy_preserved']['value']:>11.1%}{row['accuracy_preserved_chance_adjusted']['value']:>12.1%}"
              f"{versus:>24}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_comparison(argv, compare, table, __doc__.split("\n\n")[0],
                          "finished run directories; the first is the reference", OUT, "python -m benchmarks.gkd_data")


if __name__ == "__main__":
    sys.exit(main())
