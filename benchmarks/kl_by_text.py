"""Benchmark: on which text does KL to the parent rank children as the suite does?

The search minimises KL to the parent on ``data.corpus`` (the demo's novels, Bible and
fortunes), while the suite asks about science, common sense and world knowledge. For every
child of the given finished runs (as assembled and, where GKD ran, after GKD), this
measures KL(parent || child) on the test split of each ``--corpus`` (default: the first
run's evaluation text, ``evaluation.corpus`` or else ``data.corpus``, and ``knowledge``) with
the run's own ``kl_to_parent`` evaluator (on the evaluation text it repeats the run's own number), reads
the suite items the run already saved, and gives the Spearman rank correlation across
children between each text's KL and the mean accuracy over the tasks where the parent beats
chance (pooled over items, paired with the parent). A text whose KL ranks children as the
suite does is the better objective for the search. Writes ``results/kl_by_text.json``.

    .venv/bin/python -m benchmarks.kl_by_text RUN [...] [--corpus demo knowledge] [--tokens N]
                                                                        (from the checkout's root)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import attrs
import torch
from scipy.stats import spearmanr

from benchmarks.gkd_tokens import portable, write_results
from puzzle_core import layout
from puzzle_core.cache import cache_root
from puzzle_core.choices import EvaluatorChoice
from puzzle_core.config import structure, unstructure
from puzzle_core.corpus import load_corpus
from puzzle_core.errors import UserError
from puzzle_core.interfaces import EvalContext
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.report import model_items, paired_accuracy, tasks_above_chance
from puzzle_core.rundir import RunDir
from puzzle_core.schema import corpus_choice, load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "kl_by_text.json"


class RememberedForward(torch.nn.Module):
    """The parent's forward pass, computed once per batch: every child is compared on the same batches."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.outputs: dict[bytes, object] = {}

    def forward(self, input_ids: torch.Tensor):
        key = input_ids.cpu().numpy().tobytes() + bytes(str(tuple(input_ids.shape)), "ascii")
        if key not in self.outputs:
            self.outputs[key] = self.model(input_ids=input_ids)
        return self.outputs[key]


def children_of(run: Path) -> list[dict]:
    """The run's evaluated children (assembled and after GKD), with their folders and suite items."""
    results = layout.read_eval_results(RunDir(run))
    if results is None:
        raise UserError(f"{run}: no evaluation results ({layout.EVAL_RESULTS}); pass finished run directories.")
    return [{"run": run, "model": key, "phase": found.phase, "folder": run / found.path,
             "kl_recorded": found.metrics.get("kl_to_parent"), "speedup": found.metrics.get("measured_speedup"),
             "params": found.params}
            for key, found in results.models.items() if found.role == "child"]


def kl_choice(config, tokens: int | None) -> EvaluatorChoice:
    """The run's own ``kl_to_parent`` (its sequence length and batch), on ``tokens`` test tokens when given."""
    configured = next((c for c in config.evaluation.evaluators if c.name == "kl_to_parent"), None)
    choice = configured or structure("kl_to_parent", EvaluatorChoice)
    if tokens is not None:
        choice = attrs.evolve(choice, options=attrs.evolve(choice.options, tokens=tokens))
    return choice


def evaluated_alike(config) -> tuple:
    """What makes two runs' suite items pair and their recorded KL compare."""
    return config.parent, config.seed, config.evaluation.evaluators, config.evaluation_corpus


def measure(runs: Sequence[Path], corpora: Sequence[str] | None, tokens: int | None) -> dict:
    config = load_config(runs[0] / layout.CONFIG)
    for run in runs[1:]:
        other = load_config(run / layout.CONFIG)
        if evaluated_alike(other) != evaluated_alike(config):
            raise UserError(f"{run} has another parent, seed or evaluation than {runs[0]}; its suite items would not "
                            f"pair. Pass runs evaluated alike (one ablation's arms).")
    children = [child for run in runs for child in children_of(run)]
    registries = get_registries()
    torch.set_num_threads(config.threads)
    family, parent = load_parent(config.parent, registries)
    parent = attrs.evolve(parent, model=RememberedForward(parent.model))
    texts = [corpus_choice(name, "--corpus") for name in corpora] if corpora else \
        [config.evaluation_corpus, corpus_choice("knowledge", "--corpus")]
    labels = [text.name for text in texts]
    kl = kl_choice(config, tokens)
    evaluator = registries.record(kl).create(kl.options)
    contexts = [EvalContext(parent=parent, corpus=load_corpus(attrs.evolve(config.data, corpus=text), parent.tokenizer,
                                                              config.seed, registries),
                            scenario=config.scenario, threads=config.threads, seed=config.seed,
                            cache_dir=cache_root() / "eval")
                for text in texts]
    above = tasks_above_chance(model_items(RunDir(runs[0]), "parent"))
    parent_items = {run: model_items(RunDir(run), "parent", above) for run in runs}
    rows = []
    for child in children:
        started = time.perf_counter()
        model = family.load_child(child["folder"], dtype=config.parent.dtype)
        measured = {label: evaluator.evaluate(model, context)["kl_to_parent"]
                    for label, context in zip(labels, contexts)}
        paired = paired_accuracy(parent_items[child["run"]], model_items(RunDir(child["run"]), child["model"], above))
        if paired is None:
            raise UserError(f"{child['run']}: {child['model']} has no suite items that pair with the parent's.")
        rows.append({**{k: v for k, v in child.items() if k not in ("run", "folder")}, "run": portable(child["run"]),
                     "kl": measured, "accuracy": paired["mean"]["child"],
                     "chance_adjusted": paired["mean"]["chance_adjusted"]})
        print(f"{rows[-1]['run']} {child['model']}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        del model
    accuracy = [row["accuracy"]["value"] for row in rows]
    spearman = {label: _rank_correlation([row["kl"][label] for row in rows], accuracy) for label in labels}
    return {"corpora": [unstructure(text) for text in texts], "labels": labels, "tokens": kl.options.tokens,
            "tasks_above_chance": sorted(above), "rows": rows, "spearman_kl_vs_accuracy": spearman}


def _rank_correlation(kl: list[float], accuracy: list[float]) -> float | None:
    """Spearman's rho (None when undefined: fewer than 3 children or a ranking of ties)."""
    rho = float(spearmanr(kl, accuracy).statistic) if len(kl) > 2 else math.nan
    return rho if math.isfinite(rho) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories evaluated alike")
    parser.add_argument("--corpus", nargs="+", help="corpus names or paths (default: the evaluation's text and knowledge)")
    parser.add_argument("--tokens", type=int, help="test tokens per text (default: the run's kl_to_parent's)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        results = measure(args.runs, args.corpus, args.tokens)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    results = write_results(results, args.runs, args.out, "python -m benchmarks.kl_by_text")
    labels = results["labels"]
    print(f"{'run':<28}{'model':<18}{'speedup':>8}" + "".join(f"{'KL ' + label:>14}" for label in labels)
          + f"{'accuracy':>10}{'chance-adj':>12}")
    for row in results["rows"]:
        speedup = "–" if row["speedup"] is None else f"{row['speedup']:.2f}"
        print(f"{Path(row['run']).name:<28}{row['model']:<18}{speedup:>8}"
              + "".join(f"{row['kl'][label]:>14.3f}" for label in labels)
              + f"{row['accuracy']['value']:>10.1%}{row['chance_adjusted']['value']:>12.1%}")
    print(f"\nSpearman(KL, accuracy) over {len(results['rows'])} children: "
          + ", ".join(f"{label} {_signed(results['spearman_kl_vs_accuracy'][label])}" for label in labels)
          + " (-1: lower KL, higher accuracy, always)")
    print(f"\nWrote {args.out}")
    return 0


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    sys.exit(main())
