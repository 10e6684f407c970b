"""Benchmark: the replace-1-block scoring engine against its compute floor, on the SmolLM2-135M parent.

Per sampled (layer, block) the engine scores the block with ``--scorers`` (the demo's
``kl`` by default) on ``--tokens`` validation tokens; the time is this process's CPU time
(robust to other processes on a shared machine), median and range of ``--repeats``.
The floor is the work a block cannot avoid: its own sub-blocks, the layers after it and
the LM head over every scored token, counted by torch's ``FlopCounterMode`` on one plain
run of exactly that (plus causal attention's scores and weighted sums, which it does not
count on CPU), at the matrix-multiply rate of this CPU with the same threads (the
best of repeated ``torch.mm`` on a layer's shapes and the head's, ``M`` = the tokens).
``fraction`` = floor seconds / measured seconds (1.0 = at the floor). The parent's own
block needs no work (its scores are the parent's); it is timed but has no floor.
Blocks are initialised from the parent (timing does not depend on training). The
summary projects the scoring stage for the library of ``--config`` (one parent block
and the rest at ``t(i) = a + b (N - i)``, fitted to the sampled blocks).

The script only uses the engine's public calls, so the same command measures an older
checkout for a before/after table. ``--check`` also scores each sampled block the naive
way (every layer from the embeddings) and reports the largest difference.

``--compare RUN_DIR ...`` asks instead how many scoring tokens the search needs: run
directories of one config that differ only in ``scoring.tokens`` (each with the library,
score and cost stages done; the last one, with the most tokens, is the reference). It
reports the rank correlation (Spearman) and relative deviation of every block's KL score
against the reference, the MIP's choice at ``--speedup`` from each run directory (``puzzle
search``), and, as the independent check, each chosen child's measured KL to the parent
on ``--kl-tokens`` tokens of the test split of ``evaluation.corpus`` with the run's own
``kl_to_parent`` settings (assembled from the library, before GKD).

    .venv/bin/python benchmarks/scoring.py [--tokens 256] [--layers 0,10,20,29] [--threads 1] [--repeats 3] [--check]
    .venv/bin/python benchmarks/scoring.py --compare runs/t256 runs/t1024 runs/t2048 [--speedup 1.6]

Writes ``benchmarks/results/scoring.json`` (``--compare``: ``scoring_tokens.json``), or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from puzzle_core import layout
from puzzle_core.blocks import BlockSpec
from puzzle_core.interfaces import ScoringBatch
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.schema import DataSection, ParentSection, load_config
from puzzle_core.scoring import ReplaceOneBlockEngine, next_token_labels

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "scoring.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", default="smollm2-135m")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="whose library (variants per layer) the summary projects to")
    parser.add_argument("--corpus", default="synthetic", help="data.corpus to take validation tokens from")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per scoring batch (the demo's 2)")
    parser.add_argument("--scorers", default="kl", help="comma-separated scorer names")
    parser.add_argument("--layers", default="0,10,20,29", help="comma-separated layers to sample")
    parser.add_argument("--blocks", default="parent,attn_g9+ffn_768,attn_noop+ffn_1536,attn_g3+ffn_noop",
                        help="block ids per sampled layer ('parent': the layer's own block)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timings per block: median and range reported")
    parser.add_argument("--check", action="store_true", help="also score the naive way and compare")
    parser.add_argument("--label", default="", help="a name for this measurement (e.g. the commit)")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR",
                        help="run directories differing in scoring.tokens, the reference last")
    parser.add_argument("--speedup", type=float, default=1.6, help="--compare: the search's target speedup")
    parser.add_argument("--kl-tokens", type=int, default=4096, help="--compare: test tokens of each child's KL")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def validation_batches(parent, corpus: str, tokens: int, seq_len: int, batch_size: int) -> list[ScoringBatch]:
    from puzzle_core.corpus import load_corpus

    data = load_corpus(DataSection(corpus=corpus, seq_len=seq_len), parent.tokenizer)
    return [
        ScoringBatch(ids, torch.ones_like(ids, dtype=torch.bool), next_token_labels(ids))
        for ids in (torch.as_tensor(b, dtype=torch.long) for b in data.batches("validation", seq_len, batch_size, tokens))
    ]


def cpu_times(function, repeats: int) -> tuple[object, list[float]]:
    """The value and ``repeats`` CPU times of this process (others' load on a shared machine does not count)."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        value = function()
        times.append(time.process_time() - started)
    return value, times


def matmul_rates(tokens: int, hidden: int, intermediate: int, kv: int, repeats: int = 5) -> dict[str, float]:
    """FLOP per CPU second of ``torch.mm`` on one layer's shapes and on the head's (best of ``repeats``)."""
    generator = torch.Generator().manual_seed(0)
    layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, intermediate),
             (hidden, intermediate), (intermediate, hidden)]
    head = [(hidden, 8192)] * 6  # a vocabulary slice; the whole head is the same product, wider
    rates = {}
    for name, shapes in (("layer", layer), ("head", head)):
        pairs = [(torch.randn(tokens, k, generator=generator), torch.randn(k, n, generator=generator))
                 for k, n in shapes]
        flops = sum(2 * tokens * a.shape[1] * b.shape[1] for a, b in pairs)
        _, times = cpu_times(lambda: [a @ b for a, b in pairs], repeats)
        rates[name] = flops / min(times)
    return rates


def causal_attention_flops(query, key, *_args, out_shape=None, **_kwargs) -> int:
    """Scores and weighted values of causal attention (torch counts no FLOPs for CPU attention)."""
    batch, heads, length, dim = query
    keys = key[-2]
    return 4 * batch * heads * dim * (length * (length + 1) // 2 if length == keys else length * keys)


ATTENTION = torch.ops.aten.scaled_dot_product_attention
COUNTED = {ATTENTION: causal_attention_flops, ATTENTION.default: causal_attention_flops}


def floor_flops(engine, runner, layer: int, attention, ffn) -> dict[str, float]:
    """Matrix FLOPs of the unavoidable work: the block, the layers after it, and the head over every token."""
    with torch.inference_mode():
        with FlopCounterMode(display=False, custom_mapping=COUNTED) as suffix:
            finals = [child.hidden for _, child, _ in engine.outputs(layer, attention, ffn)]
        with FlopCounterMode(display=False) as head:
            for hidden in finals:
                runner.head(hidden)
    return {"suffix": float(suffix.get_total_flops()), "head": float(head.get_total_flops())}


# ---------------------------------------------------------------- how many scoring tokens


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def kl_scores(run_dir: Path) -> dict[tuple[str, str], float]:
    scores = layout.read_scores(RunDir(run_dir))
    if scores is None:
        raise SystemExit(f"{run_dir} has no replace-1-block scores; run its score stage first.")
    return {(layer, block): values["kl"] for layer, blocks in scores.layers.items() for block, values in blocks.items()}


def compare(args) -> dict:
    """Scores at fewer tokens against the reference run, the MIP's choices, and the chosen children's real KL."""
    from puzzle_core.bld import load_sublayers
    from puzzle_core.evaluation import eval_context
    from puzzle_core.pipeline import RunContext
    from puzzle_plugins.model_metrics import KLOptions, KLToParent

    torch.set_num_threads(args.threads)
    runs = [RunContext(load_config(RunDir(d).path(layout.CONFIG)), RunDir(d)) for d in args.compare]
    scores = [kl_scores(d) for d in args.compare]
    reference = scores[-1]
    replaced = [k for k, v in reference.items() if v > 0]  # parent blocks score 0 at every size
    kinds = {"all": lambda b: True, "FFN no-op": lambda b: b.endswith("ffn_noop"),
             "attention no-op": lambda b: b.startswith("attn_noop")}
    rows = []
    for run, run_scores, run_dir in zip(runs, scores, args.compare):
        # the run's own kl_to_parent settings (sequence length, batch) at --kl-tokens: at its evaluator's tokens, the
        # run's main child measures what its evaluate stage did
        choice = next((c for c in run.config.evaluation.evaluators if c.name == "kl_to_parent"), None)
        evaluator = KLToParent(attrs.evolve(choice.options if choice is not None else KLOptions(), tokens=args.kl_tokens))
        chosen = json.loads(subprocess.run(
            [sys.executable, "-m", "puzzle_core.cli", "search", str(run_dir), "--speedup", str(args.speedup), "--json"],
            check=True, capture_output=True, text=True).stdout)
        blocks = [BlockSpec.parse(chosen["chosen"][f"layer_{i}"]) for i in range(len(chosen["chosen"]))]
        child = run.family.build_child(run.parent, blocks, load_sublayers(run.run_dir, blocks))
        context = eval_context(run)  # KL on evaluation.corpus's test split, as the run's own evaluation measures it
        row = {"run_dir": run_dir.name, "tokens": run.config.scoring.tokens, "chosen": chosen["chosen"],
               "objective": chosen["objective_value"], "status": chosen["status"],
               "reference_objective": sum(reference[(layer, block)] for layer, block in chosen["chosen"].items()),
               "child": evaluator.evaluate(child, context)}
        for kind, keep in kinds.items():
            keys = [k for k in replaced if keep(k[1])]
            deviation = sorted(abs(run_scores[k] / reference[k] - 1) for k in keys)
            row[kind] = {"blocks": len(keys), "spearman": spearman([run_scores[k] for k in keys],
                                                                   [reference[k] for k in keys]),
                         "median_relative_deviation": statistics.median(deviation),
                         "max_relative_deviation": deviation[-1]}
        rows.append(row)
    last = rows[-1]["chosen"]
    for row in rows:
        row["layers_differing_from_reference"] = sorted(k for k in last if row["chosen"][k] != last[k])
    print(f"{'tokens':>6s} {'spearman (all / FFN no-op / attn no-op)':>40s} {'median dev':>10s} {'max dev':>8s} "
          f"{'layers != ref':>13s} {'sum of ref KL':>13s} {'child KL':>9s} {'child LM loss':>13s}")
    for row in rows:
        correlations = " / ".join(f"{row[kind]['spearman']:.4f}" for kind in kinds)
        print(f"{row['tokens']:6d} {correlations:>40s} "
              f"{row['all']['median_relative_deviation']:10.1%} {row['all']['max_relative_deviation']:8.1%} "
              f"{len(row['layers_differing_from_reference']):13d} {row['reference_objective']:13.4f} "
              f"{row['child']['kl_to_parent']:9.4f} {row['child']['test_lm_loss']:13.4f}")
    return {"benchmark": "how many replace-1-block scoring tokens the search needs", "speedup": args.speedup,
            "kl_tokens": args.kl_tokens, "reference": args.compare[-1].name, "runs": rows}


def main() -> None:
    args = parse_args()
    if args.compare:
        out = args.out or RESULTS.with_name("scoring_tokens.json")
        atomic_write_json(out, compare(args))
        print(f"wrote {out}")
        return
    torch.set_num_threads(args.threads)
    registries = get_registries()
    family, parent = load_parent(ParentSection(source=args.parent), registries)
    runner = family.layer_runner(parent.model)
    config = load_config(args.config)
    provider = config.library.variants.create(registries) if config.library.variants else \
        registries.block_variants.get(family.default_variants).create()
    names = args.scorers.split(",")
    scorers = {name: registries.scorers.get(name).create() for name in names}
    batches = validation_batches(parent, args.corpus, args.tokens, args.seq_len, args.batch_size)
    tokens = sum(b.input_ids.numel() for b in batches)
    shape = parent.shape
    rates = matmul_rates(min(tokens, 2048), shape.hidden_size, shape.intermediate_size,
                         shape.num_key_value_heads * shape.head_dim)
    print(f"matmul rate ({args.threads} thread(s), CPU time): layer shapes {rates['layer'] / 1e9:.1f} GFLOP/s, "
          f"head {rates['head'] / 1e9:.1f} GFLOP/s", flush=True)

    engine, (build_s,) = cpu_times(lambda: ReplaceOneBlockEngine(
        runner, batches, keep_log_probs=any(getattr(s, "needs_parent_log_probs", False) for s in scorers.values()),
        vocab_size=shape.vocab_size, max_cache_mib=1 << 16, references=scorers, progress=False), 1)

    def module(layer, part, spec, parent_spec):
        if spec == parent_spec:
            return runner.sublayer(layer, part)
        return family.init_sublayer(parent, layer, spec, None, method=provider.init_method).eval()

    rows = []
    num_layers = shape.num_layers
    print(f"{'layer':>5} {'block':22s} {'CPU s (median [range])':>26s} {'floor s':>8s} {'fraction':>8s}", flush=True)
    for layer in (int(x) for x in args.layers.split(",")):
        own = shape.blocks[layer]
        for block_id in args.blocks.split(","):
            block = own if block_id == "parent" else BlockSpec.parse(block_id)
            attention = module(layer, "attention", block.attention, own.attention)
            ffn = module(layer, "ffn", block.ffn, own.ffn)
            scores, times = cpu_times(lambda: engine.score(layer, attention, ffn, scorers), args.repeats)
            row = {"layer": layer, "block": block.id, "parent_block": block == own, "cpu_s": statistics.median(times),
                   "cpu_s_range": [min(times), max(times)], "scores": scores}
            if block != own:
                flops = floor_flops(engine, runner, layer, attention, ffn)
                floor = flops["suffix"] / rates["layer"] + flops["head"] / rates["head"]
                row.update(flops=flops, floor_s=floor, fraction_of_floor=floor / row["cpu_s"])
            if args.check:
                naive = engine.score(layer, attention, ffn, scorers, reuse_prefix=False)
                row["max_abs_difference_to_naive"] = max(abs(scores[n] - naive[n]) for n in names)
            rows.append(row)
            floor_text = (f"{row['floor_s']:8.3f} {row['fraction_of_floor']:8.2f}" if "floor_s" in row
                          else f"{'-':>8s} {'-':>8s}")
            print(f"{layer:5d} {block.id:22s} {row['cpu_s']:8.3f} [{min(times):.3f}-{max(times):.3f}]   {floor_text}",
                  flush=True)

    replaced = [r for r in rows if not r["parent_block"]]
    measured, floor = sum(r["cpu_s"] for r in replaced), sum(r["floor_s"] for r in replaced)
    slope, intercept = np.polyfit([num_layers - r["layer"] for r in replaced], [r["cpu_s"] for r in replaced], 1)
    floor_slope, floor_intercept = np.polyfit([num_layers - r["layer"] for r in replaced],
                                              [r["floor_s"] for r in replaced], 1)
    parent_s = statistics.median([r["cpu_s"] for r in rows if r["parent_block"]] or [0.0])
    per_layer = [len(provider.variants(shape, i).blocks()) for i in range(num_layers)]
    projected = build_s + sum(parent_s + (n - 1) * (intercept + slope * (num_layers - i))
                              for i, n in enumerate(per_layer))
    projected_floor = sum((n - 1) * (floor_intercept + floor_slope * (num_layers - i)) for i, n in enumerate(per_layer))
    print(f"\nreplaced blocks sampled: {measured:.1f} CPU s vs floor {floor:.1f} s: {floor / measured:.2f} of the floor "
          f"rate; the parent's own block {parent_s:.3f} s; cache build {build_s:.1f} s (once)")
    print(f"library of {args.config.name} ({sum(per_layer)} blocks), projected: {projected / 60:.1f} CPU min "
          f"(floor {projected_floor / 60:.1f} min) at {args.threads} thread(s), {tokens} tokens")
    if args.check:
        print(f"max |engine - naive| over all scores: {max(r['max_abs_difference_to_naive'] for r in rows):.1e}")

    out = args.out or RESULTS
    atomic_write_json(out, {
        "benchmark": "replace-1-block scoring engine vs its compute floor",
        "label": args.label,
        "parent": args.parent,
        "tokens": tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "scorers": names,
        "threads": args.threads,
        "repeats": args.repeats,
        "clock": "process CPU time (time.process_time); median and range of the repeats",
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "matmul_flops_per_cpu_s": rates,
        "cache_build_s": build_s,
        "rows": rows,
        "sampled": {"cpu_s": measured, "floor_s": floor, "fraction_of_floor": floor / measured,
                    "parent_block_s": parent_s},
        "projected_library": {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT)
                                            else args.config),
                              "blocks": sum(per_layer), "cpu_s": projected, "floor_s": projected_floor},
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
