"""Benchmark: what evaluating one model on the suite costs, per task, three ways.

For each task of the ``lm_eval`` suite, on the same seeded items (``--limit`` per task),
the same log-likelihood requests are scored by:

- ``hflm``: lm-eval's own ``HFLM`` (each answer re-reads its question, padded batches of
  ``--batch-size`` sequences, log-softmax over every position);
- ``ours``: :class:`puzzle_plugins.tasks.harness.SharedContextLM` (each question read
  once for all its answers, packed without padding into rows of ``--batch-tokens``, head and
  log-softmax on scored positions only);
- ``forward``: a plain forward pass (full logits) over as many tokens as ``ours`` reads,
  packed densely into rows of ``--row`` tokens: the speed the model itself allows.

"Tokens" are the tokens ``ours`` reads (every question once, every answer once), so
tokens per second compare the three on the same work; ``hflm`` reads more (column
``hflm tokens``). Times are CPU seconds of this process (robust to others' load on a
shared machine; with ``--threads`` busy threads they are about ``threads`` x wall time
on an idle machine) and wall seconds, median and range over ``--repeats`` interleaved
repeats. ``cpu-s/model`` projects each task to the limits of ``--config`` (default: the
demo's) from ``ours``' CPU time per item, with the tokens that takes; wall time on idle
cores follows from those tokens and the forward speed the cores allow (``ours/fwd``
says how close to it the evaluation runs). The log-likelihoods of ``hflm`` and ``ours``
are compared (largest absolute difference).

    .venv/bin/python benchmarks/eval_cost.py [--limit 100] [--repeats 3] [--threads 2]

Writes ``benchmarks/results/eval_cost.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from puzzle_core.choices import EvaluatorChoice
from puzzle_core.config import structure
from puzzle_core.evaluation import EvalContext
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.rundir import atomic_write_json
from puzzle_core.schema import ParentSection

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "eval_cost.json"
METHODS = ("hflm", "ours", "forward")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="project seconds per model to this config's lm_eval limits")
    parser.add_argument("--batch-size", type=int, default=8, help="HFLM's sequences per batch")
    parser.add_argument("--batch-tokens", type=int, default=512, help="ours: tokens per packed row (one forward)")
    parser.add_argument("--row", type=int, default=256, help="forward: tokens per row (8 rows per batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def lm_eval_options(config: Path) -> dict:
    """The ``lm_eval`` evaluator's options in a run config."""
    for entry in yaml.safe_load(config.read_text())["evaluation"]["evaluators"]:
        if isinstance(entry, dict) and entry.get("name") == "lm_eval":
            return {key: value for key, value in entry.items() if key != "name"}
    return {}


def lm_eval(**options):
    """The ``lm_eval`` evaluator with ``options``, as a run config would pick it."""
    choice = structure({"name": "lm_eval", **options}, EvaluatorChoice)
    return get_registries().record(choice).create(choice.options)


def task_requests(evaluator, context: EvalContext) -> dict[str, list]:
    """Per task, the log-likelihood requests of its seeded items, as lm-eval builds them."""
    requests = {}
    for name, (task, _) in evaluator.load_tasks(context).items():
        task.build_all_requests(rank=0, world_size=1)
        requests[name] = [instance for instance in task.instances if instance.request_type == "loglikelihood"]
    return requests


def timed(function) -> tuple:
    cpu, wall = time.process_time(), time.perf_counter()
    value = function()
    return value, time.process_time() - cpu, time.perf_counter() - wall


def forward_pass(model, tokens: int, row: int):
    """Full-logit forwards over ``tokens`` tokens in rows of ``row`` (8 rows per call)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    done = 0
    with torch.no_grad():
        while done < tokens:
            rows = min(8, -(-(tokens - done) // row))
            width = min(row, tokens - done) if rows == 1 else row
            model(input_ids=torch.randint(0, vocab, (rows, width), generator=generator))
            done += rows * width


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    from puzzle_plugins.tasks.harness import SharedContextLM

    _, parent = load_parent(ParentSection(source=args.parent), get_registries())
    model = parent.model.eval()
    evaluator = lm_eval(tasks=["suite"], default_limit=args.limit)
    context = EvalContext(parent=parent, cache_dir=Path(os.environ.get("TMPDIR", "/tmp")) / "puzzle-eval-cost")
    projected_limits = structure({"name": "lm_eval", **lm_eval_options(args.config)}, EvaluatorChoice).options
    requests = task_requests(evaluator, context)
    everything = lm_eval(tasks=["suite"])  # every item: task sizes
    sizes = {name: len(ids) for name, (_, ids) in everything.load_tasks(context).items()}

    def hflm():
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(parent.tokenizer), backend="causal", device="cpu",
                  batch_size=args.batch_size)
        return lm.loglikelihood(instances, disable_tqdm=True), None

    def ours():
        lm = SharedContextLM(pretrained=model, tokenizer=copy.deepcopy(parent.tokenizer), backend="causal",
                             device="cpu", batch_size=args.batch_size, batch_tokens=args.batch_tokens)
        return lm.loglikelihood(instances, disable_tqdm=True), lm.tokens_read

    rows = []
    for name, instances in requests.items():
        items = len({instance.doc_id for instance in instances})
        hflm_lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(parent.tokenizer), backend="causal", device="cpu")
        hflm_tokens = sum(min(len(c) + len(k), hflm_lm.max_length + 1) - 1 for c, k in (
            hflm_lm._encode_pair(*instance.args) for instance in instances))
        cpu = {method: [] for method in METHODS}
        wall = {method: [] for method in METHODS}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load hits every method alike
            (outputs["hflm"], _), seconds, elapsed = timed(hflm)
            cpu["hflm"].append(seconds)
            wall["hflm"].append(elapsed)
            (outputs["ours"], read), seconds, elapsed = timed(ours)
            cpu["ours"].append(seconds)
            wall["ours"].append(elapsed)
            _, seconds, elapsed = timed(lambda: forward_pass(model, read, args.row))
            cpu["forward"].append(seconds)
            wall["forward"].append(elapsed)
        difference = max(abs(a[0] - b[0]) for a, b in zip(outputs["hflm"], outputs["ours"]))
        limit = projected_limits.limit_of(name)
        projected = sizes[name] if limit == "full" else min(limit, sizes[name])
        per_item = statistics.median(cpu["ours"]) / items
        row = {
            "task": name,
            "items": items,
            "requests": len(instances),
            "tokens": read,
            "hflm_tokens": hflm_tokens,
            "cpu_s": {m: spread(cpu[m]) for m in METHODS},
            "wall_s": {m: spread(wall[m]) for m in METHODS},
            "tokens_per_cpu_s": {m: read / statistics.median(cpu[m]) for m in METHODS},
            "ours_vs_hflm": statistics.median(cpu["hflm"]) / statistics.median(cpu["ours"]),
            "ours_vs_forward": statistics.median(cpu["forward"]) / statistics.median(cpu["ours"]),
            "max_abs_loglikelihood_difference": difference,
            "projected_limit": limit,
            "projected_items": projected,
            "projected_tokens_per_model": read / items * projected,
            "projected_cpu_seconds_per_model": per_item * projected,
        }
        rows.append(row)
        print(f"{name:14s} {items:4d} items {read:7d} tokens (hflm {hflm_tokens:7d})  CPU s: "
              + "  ".join(f"{m} {statistics.median(cpu[m]):7.1f}" for m in METHODS)
              + f"  ours x{row['ours_vs_hflm']:.2f} vs hflm, {row['ours_vs_forward']:.2f} of forward speed"
              + f"  |dLL| {difference:.1e}", flush=True)

    print()
    header = (f"{'task':14s} {'items':>5s} {'tokens':>7s} {'hflm tok':>8s} " + " ".join(
        f"{m + ' tok/cpu-s':>17s}" for m in METHODS) + f" {'ours/hflm':>9s} {'ours/fwd':>8s} {'cpu-s/model*':>12s}")
    print(header)
    for row in rows:
        print(f"{row['task']:14s} {row['items']:5d} {row['tokens']:7d} {row['hflm_tokens']:8d} "
              + " ".join(f"{row['tokens_per_cpu_s'][m]:17.0f}" for m in METHODS)
              + f" {row['ours_vs_hflm']:8.2f}x {row['ours_vs_forward']:8.2f}"
              + f" {row['projected_cpu_seconds_per_model']:12.0f}")
    total = {key: sum(r[key] for r in rows) for key in ("projected_tokens_per_model", "projected_cpu_seconds_per_model")}
    sizes_used = ", ".join(f"{r['task']} {r['projected_items']}" for r in rows)
    print(f"* one model at the limits of {args.config.name} ({sizes_used}):"
          f" {total['projected_tokens_per_model']:.0f} tokens, {total['projected_cpu_seconds_per_model']:.0f} CPU s "
          f"at {args.threads} thread(s), projected from these items")

    atomic_write_json(args.out, {
        "benchmark": "evaluation cost per task: lm-eval HFLM vs SharedContextLM vs a plain forward pass",
        "parent": args.parent,
        "limit": args.limit,
        "threads": args.threads,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "batch_tokens": args.batch_tokens,
        "row": args.row,
        "clock": "process CPU time (time.process_time) and wall time; median and range of interleaved repeats",
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average": list(os.getloadavg()), "torch": torch.__version__},
        "projection": {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
                       "tokens_per_model": total["projected_tokens_per_model"],
                       "cpu_seconds_per_model": total["projected_cpu_seconds_per_model"]},
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
