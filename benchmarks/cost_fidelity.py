"""Benchmark: how well the cost models predict real speedups.

Part 1, ``measured`` on this machine, in the scenario of ``--config`` (the demo's: 4
prompts of 128 tokens, 32 generated tokens, fp32, 2 threads). DeciLM children of the
SmolLM2-135M parent are built from the demo's block space so that the ``measured`` cost
model predicts about 1.25x, 1.5x, 1.75x and 2x (prediction = fixed costs + the sum of the
blocks' costs; the blocks are timed in this run, ``--cost-runs`` independent times to
show how much the prediction itself moves). A fifth child, ``~1.0x``, is the parent
itself rebuilt in the children's code: it measures 1.0x when the parent as loaded and
the children are timed alike (weights in memory of their own, ``owns_weights``). Each
child is then measured end to end by the ``throughput`` evaluator the demo uses:
``generate`` paired with the parent round by round, speedup = median of per-round ratios
with its quartiles and range; ``--measurements`` independent measurements per
child (interleaved over the children) show how well one measurement repeats. Target:
predicted within 5% of measured, and one child's measurements within +-3% of each other.
Latencies are compared too (predicted ms against each model's own measured ms, the
parent as loaded included), which splits a speedup error into the children's part and
the parent's. Cost model and evaluator time the same thing (``generate``), with the same
threads, clock and statistic (median of paired rounds).

Part 2, the analytic roofline models (``h100``, ``rtx4090``), from configs alone:
per-layer runtimes of Llama-3.1-70B- and -8B-shaped parents, the speedup of
Nemotron-51B over Llama-3.1-70B at equal batch, and the paper's scenario table (fp8,
128 in / 1024 out on H100s): Nemotron-51B on one GPU vs Llama-3.1-70B at tensor-parallel
degree 1 and 4, published as 6472 vs 1274 and 2975 output tokens/s per GPU (5.08x and
2.17x), each predicted at the largest batch whose weights + KV cache fit every GPU of
the group (the paper's speedups come from fitting larger batches), with the all-reduces
of tensor parallelism priced over NVLink (:mod:`puzzle_core.roofline`). Degrees 2 and 8
are predicted too (nothing published). Nemotron-51B's ``block_configs`` are not
available offline: they are reconstructed (see :func:`nemotron_51b_config`) unless
``--nemotron-config`` points at the published ``config.json``.

    .venv/bin/python benchmarks/cost_fidelity.py [--config configs/demo.yaml] [--threads N] [--clock wall]
        [--layers 8] [--repeats 5] [--rounds 7] [--cost-runs 2] [--measurements 2] [--skip-measured]
        [--nemotron-config PATH] [--max-batch 1024] [--out PATH]

Writes ``benchmarks/results/cost_fidelity.json``; with ``--skip-measured`` (part 2 only,
a second) ``benchmarks/results/scenario_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import attrs
import torch

from puzzle_core.blocks import BlockSpec
from puzzle_core.choices import EvaluatorChoice
from puzzle_core.config import structure
from puzzle_core.interfaces import EvalContext
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.costing import largest_batch, model_costs
from puzzle_core.rundir import atomic_write_json
from puzzle_core.schema import Scenario, load_config
from puzzle_core.timing import CLOCKS
from puzzle_plugins.measured_cost import MeasuredCostModel, MeasuredOptions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "cost_fidelity.json"
ANALYTIC_RESULTS = Path(__file__).parent / "results" / "scenario_table.json"
GIB = 1024

# Replaced layers get these blocks in turn (the demo's space: attention 3 / 1 KV heads or none, FFN 1536 / 768 /
# 384 or none), spread over the depth until the predicted speedup is closest to each target.
RECIPE = ["attn_g9+ffn_768", "attn_noop+ffn_384", "attn_g3+ffn_noop", "attn_noop+ffn_noop", "attn_g9+ffn_384",
          "attn_noop+ffn_1536"]
TARGETS = (1.0, 1.25, 1.5, 1.75, 2.0)  # 1.0: no layer replaced, the parent in the children's code

LLAMA_31_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_31_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "tie_word_embeddings": False,
}
# The paper's scenario table, 128 in / 1024 out on H100s (fp8): (model, tensor-parallel degree, published output
# tokens/s per GPU, None where it gives none).
PAPER_ROWS = [("nemotron-51b", 1, 6472), ("llama-3.1-70b", 1, 1274), ("llama-3.1-70b", 2, None),
              ("llama-3.1-70b", 4, 2975), ("llama-3.1-70b", 8, None)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="its parent and scenario are used")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the scenario's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'wall' (the truth on an idle machine) or 'process' (CPU time; steadier when shared)")
    defaults = attrs.fields(MeasuredOptions)
    parser.add_argument("--layers", type=int, default=defaults.layers.default, help="copies of a block per timed model")
    parser.add_argument("--repeats", type=int, default=defaults.repeats.default, help="timed rounds per block")
    parser.add_argument("--rounds", type=int, help="timed rounds per end-to-end measurement (default: the "
                        "throughput evaluator's)")
    parser.add_argument("--cost-runs", type=int, default=2, help="independent measurements of every block")
    parser.add_argument("--measurements", type=int, default=2, help="independent end-to-end measurements per child")
    parser.add_argument("--skip-measured", action="store_true", help="only the analytic part")
    parser.add_argument("--nemotron-config", type=Path, help="the published config.json of Nemotron-51B")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch considered for throughput")
    parser.add_argument("--out", type=Path, help=f"default: {RESULTS.name}, with --skip-measured {ANALYTIC_RESULTS.name}")
    args = parser.parse_args()
    args.out = args.out or (ANALYTIC_RESULTS if args.skip_measured else RESULTS)
    return args


# ---------------------------------------------------------------- part 1: measured vs end to end


def predicted_ms(fixed: dict, costs: dict, blocks) -> float:
    return fixed["runtime_ms"] + sum(costs[b.id]["runtime_ms"] for b in blocks)


def choose_child(parent_blocks, recipe: list[str], target: float, runtime) -> list[BlockSpec]:
    """Replace layers (spread over the depth, middle first) with the recipe's blocks until the
    predicted speedup is closest to ``target``."""
    layers = len(parent_blocks)
    order = sorted(range(1, layers - 1), key=lambda i: (abs(i - layers / 2), i))  # keep first and last layer
    parent_ms = runtime(parent_blocks)
    best, best_gap = list(parent_blocks), abs(1 - target)
    blocks = list(parent_blocks)
    for count, layer in enumerate(order):
        blocks[layer] = BlockSpec.parse(recipe[count % len(recipe)])
        gap = abs(parent_ms / runtime(blocks) - target)
        if gap < best_gap:
            best, best_gap = list(blocks), gap
    return best


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "relative_range": (max(values) - min(values)) / statistics.median(values)}


def measured_part(args, registries) -> dict:
    config = load_config(args.config)
    family, parent = load_parent(config.parent, registries)
    shape = parent.shape
    scenario = config.scenario if args.threads is None else attrs.evolve(config.scenario, threads=args.threads)
    options = MeasuredOptions(layers=args.layers, repeats=args.repeats, clock=args.clock, cache=False)
    offered = list(dict.fromkeys([*shape.blocks, *(BlockSpec.parse(b) for b in RECIPE)]))
    print(f"measured costs ({scenario}; {options}), {args.cost_runs} run(s)...", flush=True)
    started = time.perf_counter()
    cost_runs = []
    for _ in range(args.cost_runs):
        model = MeasuredCostModel(options)
        cost_runs.append((model.fixed_costs(shape, scenario, family),
                          {b.id: model.block_costs(shape, b, scenario, family) for b in offered}))
    costing_s = time.perf_counter() - started
    fixed, costs = cost_runs[0]
    for block in offered:
        print(f"  {block.id:24s} " + " ".join(f"{run[block.id]['runtime_ms']:8.2f}" for _, run in cost_runs) + " ms",
              flush=True)
    print(f"  {'fixed':24s} " + " ".join(f"{f['runtime_ms']:8.2f}" for f, _ in cost_runs) + " ms", flush=True)
    children = {f"~{target}x": choose_child(shape.blocks, RECIPE, target,
                                            lambda blocks: predicted_ms(fixed, costs, blocks)) for target in TARGETS}

    throughput_options = {"name": "throughput", "clock": args.clock, **({"repeats": args.rounds} if args.rounds else {})}
    choice = structure(throughput_options, EvaluatorChoice)
    evaluator = registries.record(choice).create(choice.options)
    context = EvalContext(parent=parent, scenario=scenario, threads=scenario.threads, seed=config.seed)
    models = {name: family.build_child(parent, blocks) for name, blocks in children.items()}
    print(f"measuring {len(models)} children end to end against the parent, {args.measurements} time(s) each...",
          flush=True)
    started = time.perf_counter()
    measurements: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.measurements):
        for name, child in models.items():
            measurements[name].append(evaluator.evaluate(child, context))
    e2e_s = time.perf_counter() - started

    rows = []
    for name, blocks in children.items():
        predicted = [predicted_ms(f, c, shape.blocks) / predicted_ms(f, c, blocks) for f, c in cost_runs]
        measured = [m["measured_speedup"] for m in measurements[name]]
        row = {
            "child": name,
            "blocks": {b.id: sum(1 for x in blocks if x == b) for b in dict.fromkeys(blocks)},
            "predicted_ms": predicted_ms(fixed, costs, blocks),
            "predicted_speedup": predicted[0],
            "predicted_speedups": predicted,
            "measured_speedup": statistics.median(measured),
            "measured_ms": statistics.median(m["latency_s"] * 1e3 for m in measurements[name]),
            "measurements": measurements[name],
            "measured_spread": spread(measured),
        }
        row["speedup_error"] = row["predicted_speedup"] / row["measured_speedup"] - 1
        row["latency_error"] = row["predicted_ms"] / row["measured_ms"] - 1
        rows.append(row)
    tokens = scenario.batch_size * scenario.decode_len
    parent_ms = statistics.median(tokens / m["parent_throughput_tok_s"] * 1e3 for ms in measurements.values() for m in ms)
    return {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "parent": config.parent.source,
        "scenario": attrs.asdict(scenario),
        "options": attrs.asdict(options),
        "throughput_options": attrs.asdict(evaluator.options),
        "cost_runs": [{"fixed": f, "block_costs": c} for f, c in cost_runs],
        "children": rows,
        "parent_predicted_ms": predicted_ms(fixed, costs, shape.blocks),
        "parent_measured_ms": parent_ms,  # the parent as loaded (its own family's code), median over every pairing
        "costing_seconds": costing_s,
        "end_to_end_seconds": e2e_s,
    }


def print_measured(part: dict) -> None:
    e2e = part["throughput_options"]
    print()
    print(f"measured cost model vs the throughput evaluator ({part['options']['clock']} clock, "
          f"{part['scenario']['threads']} thread(s); measured = median of {e2e['repeats']} paired rounds; "
          f"IQR and range of the first measurement)")
    print(f"{'child':7s} {'pred x':>14s} {'meas x':>7s} {'IQR':>13s} {'range':>13s} {'repeats':>15s} {'error':>7s} "
          f"{'pred ms':>8s} {'meas ms':>8s} {'error':>7s}  blocks")
    print(f"{'parent':7s} {'':>14s} {'':>7s} {'':>13s} {'':>13s} {'':>15s} {'':>7s} {part['parent_predicted_ms']:8.0f} "
          f"{part['parent_measured_ms']:8.0f} {part['parent_predicted_ms'] / part['parent_measured_ms'] - 1:+7.1%}  as loaded")
    for row in part["children"]:
        first = row["measurements"][0]
        mix = ", ".join(f"{n}x {b}" for b, n in row["blocks"].items())
        predicted = "/".join(f"{x:.2f}" for x in row["predicted_speedups"])
        repeats = "/".join(f"{m['measured_speedup']:.3f}" for m in row["measurements"])
        print(f"{row['child']:7s} {predicted:>14s} {row['measured_speedup']:6.2f}x "
              f"{first['measured_speedup_q1']:5.2f}-{first['measured_speedup_q3']:5.2f}x "
              f"{first['measured_speedup_min']:5.2f}-{first['measured_speedup_max']:5.2f}x "
              f"{repeats:>15s} {row['speedup_error']:+7.1%} {row['predicted_ms']:8.0f} {row['measured_ms']:8.0f} "
              f"{row['latency_error']:+7.1%}  {mix}")


# ---------------------------------------------------------------- part 2: analytic models


def nemotron_51b_config() -> dict:
    """A shape-only reconstruction of Llama-3.1-Nemotron-51B (80 layers, 51.5B parameters).

    From public facts: Llama-3.1-70B's dimensions; 51.5B parameters in total; attention
    kept (8 KV heads) in the first and last layers and skipped in a run of middle layers;
    FFNs narrowed with the ``ffn_mult`` values its sibling models publish (5.25 = the
    parent's 28672, 3.28125, 2.625, 1.3125). The per-layer pattern is ours, chosen to
    match the parameter count; the published ``block_configs`` differ layer by layer.
    """

    def block(attention: str, ffn_mult: float) -> dict:
        attention_entry = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
        if attention == "full":
            attention_entry = {"n_heads_in_group": 8, "no_op": False, "replace_with_linear": False}
        elif attention == "linear":
            attention_entry = {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True}
        return {"attention": attention_entry, "ffn": {"ffn_mult": ffn_mult, "no_op": False, "replace_with_linear": False}}

    blocks = []
    for layer in range(80):
        if layer < 8 or layer >= 72:
            blocks.append(block("full", 5.25))
        elif 40 <= layer < 64:
            blocks.append(block("none" if layer % 3 else "linear", 2.625 if layer % 2 else 3.28125))
        else:
            blocks.append(block("full", 3.28125 if layer % 5 else 5.25))
    return {**LLAMA_31_70B, "model_type": "nemotron-nas", "intermediate_size": None, "num_key_value_heads": None,
            "block_configs": blocks}


def totals(model, shape, scenario) -> dict:
    costs = model_costs(model, shape, scenario)
    return {"runtime_ms": costs.runtime_ms, "memory_mib": costs.memory_mib, "num_params": costs.total("num_params"),
            "fixed_ms": costs.fixed["runtime_ms"], "weights_mib": costs.weights_mib}


def at_largest_batch(model, shape, scenario, limit: int) -> dict:
    """Throughput at the largest batch whose weights + KV cache fit each GPU of the group."""
    best = largest_batch(model, shape, scenario, limit=limit)
    if best is None:
        return {"batch": 0, "tokens_per_s": 0.0, "tokens_per_s_per_gpu": 0.0}
    return {"batch": best.scenario.batch_size, "tokens_per_s": best.tokens_per_s,
            "tokens_per_s_per_gpu": best.tokens_per_s_per_gpu, "memory_gib_per_gpu": best.memory_mib / GIB,
            "runtime_s": best.runtime_ms / 1e3}


def paper_table(model, shapes: dict, paper: Scenario, limit: int) -> list[dict]:
    """The paper's scenario rows (and the parent at TP 2 and 8, unpublished), predicted at the largest batch."""
    rows = []
    for name, tp, published in PAPER_ROWS:
        scenario = attrs.evolve(paper, tensor_parallel=tp)
        row = {"model": name, "tensor_parallel": tp, "published_tokens_per_s_per_gpu": published,
               **at_largest_batch(model, shapes[name], scenario, limit)}
        row["predicted_over_published"] = row["tokens_per_s_per_gpu"] / published if published else None
        rows.append(row)
    child = rows[0]["tokens_per_s_per_gpu"]
    for row in rows[1:]:
        parent = row["tokens_per_s_per_gpu"]
        row["predicted_child_speedup"] = child / parent if parent else None
        row["published_child_speedup"] = (PAPER_ROWS[0][2] / row["published_tokens_per_s_per_gpu"]
                                          if row["published_tokens_per_s_per_gpu"] else None)
    return rows


def analytic_part(args, registries) -> dict:
    family = registries.architectures.get("llama").create()
    shapes = {"llama-3.1-70b": family.shape(LLAMA_31_70B), "llama-3.1-8b": family.shape(LLAMA_31_8B)}
    nemotron_source = "reconstructed (see nemotron_51b_config)"
    nemotron = nemotron_51b_config()
    if args.nemotron_config:
        nemotron, nemotron_source = json.loads(args.nemotron_config.read_text()), str(args.nemotron_config)
    shapes["nemotron-51b"] = family.shape(nemotron)
    paper = Scenario(batch_size=1, prefill_len=128, decode_len=1024, dtype="fp8", kv_dtype="fp8")
    per_layer = []
    for gpu in ("h100", "rtx4090"):
        model = registries.cost_models.get(gpu).create()
        for name in ("llama-3.1-70b", "llama-3.1-8b"):
            shape = shapes[name]
            for batch in (1, 64):
                scenario = attrs.evolve(paper, batch_size=batch)
                layer = model.block_costs(shape, shape.blocks[0], scenario, None)
                whole = totals(model, shape, scenario)
                per_layer.append({
                    "gpu": gpu, "model": name, "batch": batch, "layer_prefill_ms": layer["prefill_ms"],
                    "layer_decode_ms": layer["decode_ms"], "layer_runtime_ms": layer["runtime_ms"],
                    "fixed_ms": whole["fixed_ms"], "model_runtime_ms": whole["runtime_ms"],
                    "memory_gib": whole["memory_mib"] / GIB, "fits": whole["memory_mib"] <= model.memory_capacity_mib(scenario),
                })
    h100_model = registries.cost_models.get("h100").create()
    parent, child = shapes["llama-3.1-70b"], shapes["nemotron-51b"]
    equal_batch = []
    for batch in (1, 8, 64, 256):
        scenario = attrs.evolve(paper, batch_size=batch)
        p, c = totals(h100_model, parent, scenario), totals(h100_model, child, scenario)
        equal_batch.append({"batch": batch, "parent_ms": p["runtime_ms"], "child_ms": c["runtime_ms"],
                            "speedup": p["runtime_ms"] / c["runtime_ms"]})
    return {
        "scenario": attrs.asdict(paper),
        "h100_options": attrs.asdict(h100_model.options),
        "h100_interconnect_gbs": h100_model.gpu.interconnect_gbs,
        "max_batch": args.max_batch,
        "per_layer": per_layer,
        "nemotron_source": nemotron_source,
        "params": {name: totals(h100_model, s, paper)["num_params"] for name, s in shapes.items()},
        "equal_batch": equal_batch,
        "paper_table": paper_table(h100_model, shapes, paper, args.max_batch),
    }


def print_analytic(part: dict) -> None:
    print("\nroofline, fp8, 128 in / 1024 out:")
    print(f"{'gpu':8s} {'model':14s} {'batch':>5s} {'layer prefill':>13s} {'layer decode':>12s} {'layer total':>11s} "
          f"{'fixed':>8s} {'model':>10s} {'memory':>9s}  fits")
    for r in part["per_layer"]:
        print(f"{r['gpu']:8s} {r['model']:14s} {r['batch']:5d} {r['layer_prefill_ms']:10.3f} ms {r['layer_decode_ms']:9.2f} ms "
              f"{r['layer_runtime_ms']:8.2f} ms {r['fixed_ms']:5.0f} ms {r['model_runtime_ms'] / 1e3:7.2f} s "
              f"{r['memory_gib']:6.1f} GiB  {'yes' if r['fits'] else 'no'}")
    params = part["params"]
    print(f"\nNemotron-51B ({part['nemotron_source']}): {params['nemotron-51b'] / 1e9:.2f}B parameters vs "
          f"{params['llama-3.1-70b'] / 1e9:.2f}B, on one H100:")
    for r in part["equal_batch"]:
        print(f"  equal batch {r['batch']:4d}: parent {r['parent_ms'] / 1e3:7.2f} s, child {r['child_ms'] / 1e3:7.2f} s, "
              f"speedup {r['speedup']:.2f}x")
    print(f"\nthe paper's scenario table (H100 SXM, fp8, 128 in / 1024 out), output tokens/s per GPU at the largest "
          f"batch that fits (at most {part['max_batch']}); all-reduces over NVLink at "
          f"{part['h100_interconnect_gbs']:g} GB/s x {part['h100_options']['allreduce_efficiency']:g}:")
    print(f"{'model':14s} {'TP':>3s} {'batch':>6s} {'GiB/GPU':>8s} {'predicted':>10s} {'published':>10s} {'pred/pub':>9s}  "
          f"{'51B speedup pred / pub':>22s}")
    for r in part["paper_table"]:
        published = f"{r['published_tokens_per_s_per_gpu']:10d}" if r["published_tokens_per_s_per_gpu"] else f"{'-':>10s}"
        ratio = f"{r['predicted_over_published']:8.2f}x" if r["predicted_over_published"] else f"{'-':>9s}"
        speedup = ""
        if "predicted_child_speedup" in r:
            pub = f"{r['published_child_speedup']:.2f}x" if r["published_child_speedup"] else "-"
            speedup = f"{r['predicted_child_speedup']:.2f}x / {pub}"
        print(f"{r['model']:14s} {r['tensor_parallel']:3d} {r['batch']:6d} {r.get('memory_gib_per_gpu', 0):8.1f} "
              f"{r['tokens_per_s_per_gpu']:10.0f} {published} {ratio}  {speedup:>22s}")


def main() -> None:
    args = parse_args()
    registries = get_registries()
    results = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
    }
    if not args.skip_measured:
        results["measured"] = measured_part(args, registries)
        print_measured(results["measured"])
    results["analytic"] = analytic_part(args, registries)
    print_analytic(results["analytic"])
    results["machine"]["load_average_after"] = os.getloadavg()
    atomic_write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
