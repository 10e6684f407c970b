"""Benchmark: how well the cost models predict real speedups.

Part 1, ``measured`` on this machine. Several DeciLM children of the SmolLM2-135M parent
with different block mixes are chosen so that the ``measured`` model predicts about
1.3x, 1.6x and 2x end-to-end speedups (prediction = fixed costs + the sum of the
blocks' costs). Each child is then assembled with the family's ``build_child`` and run
end to end with ``generate`` (greedy, the scenario's batch, prompt and output lengths).
The blocks are measured in the same run, right before. Target: predicted within 5% of
measured. Both sides use the same clock and statistic: by default the process's CPU time
with one thread and the fastest of several runs, which on a busy shared machine leaves
out time taken by other processes (wall-clock speedups of the same runs are reported too).

Part 2, the analytic roofline models (``h100``, ``rtx4090``), from configs alone:
per-layer runtimes of Llama-3.1-70B- and -8B-shaped parents, and the predicted speedup
of Nemotron-51B over Llama-3.1-70B for the paper's workload (fp8, 128 in / 1024 out):
at equal batch, and as throughput at the largest batch each model fits on one H100
(the paper's setting, which also credits the child's smaller memory footprint). The
paper/blog measured 6472 vs 2975 output tokens/s per GPU (2.17x; the parent on its best
tensor-parallel GPU count) and 1274 tokens/s for the parent on one GPU. Nemotron-51B's
``block_configs`` are reconstructed (see :func:`nemotron_51b_config`) unless
``--nemotron-config`` points at the published ``config.json``.

    .venv/bin/python benchmarks/cost_fidelity.py [--threads 1] [--batch 8] [--prefill 32] [--decode 16]
        [--layers 8] [--repeats 7] [--runs 7] [--statistic min] [--skip-measured] [--nemotron-config PATH]

Writes ``benchmarks/results/cost_fidelity.json``.
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
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.rundir import atomic_write_json
from puzzle_core.schema import ParentSection, Scenario
from puzzle_plugins.measured_cost import CLOCKS, STATISTICS, MeasuredCostModel, MeasuredOptions, torch_threads
from puzzle_core.roofline import GPUSpec, RooflineCostModel

RESULTS = Path(__file__).parent / "results" / "cost_fidelity.json"
GIB = 1024

# Recipes for children: the block a replaced layer gets, cycling over the list.
RECIPES = {
    "narrow": ["attn_g9+ffn_768"],
    "mixed": ["attn_g9+ffn_384", "attn_linear+ffn_768"],
    "skip": ["attn_noop+ffn_384", "attn_noop+ffn_noop", "attn_linear+ffn_384"],
}
TARGETS = (("narrow", 1.3), ("mixed", 1.6), ("skip", 2.0))

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
PAPER = {"child_tokens_per_s": 6472, "parent_tokens_per_s_best_tp": 2975, "parent_tokens_per_s_one_gpu": 1274}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8, help="copies of a block per timed model")
    parser.add_argument("--repeats", type=int, default=7, help="timings per block measurement")
    parser.add_argument("--runs", type=int, default=7, help="end-to-end runs per model")
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="min",
                        help="of the repeats and runs: 'min' (steadiest on a busy machine) or 'median'")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process",
                        help="'process' (CPU time; steady on a shared machine with --threads 1) or 'wall'")
    parser.add_argument("--use-cache", action="store_true", help="reuse cached block costs instead of measuring now")
    parser.add_argument("--skip-measured", action="store_true", help="only the analytic part")
    parser.add_argument("--nemotron-config", type=Path, help="the published config.json of Nemotron-51B")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch considered for throughput")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


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


def time_generate(models: dict, scenario: Scenario, runs: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds of ``generate`` per model and clock; the models take turns in every run (plus a warm-up)."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(0, vocab, (scenario.batch_size, scenario.prefill_len), generator=generator)
    mask = torch.ones_like(ids)
    times = {name: {clock: [] for clock in CLOCKS} for name in models}
    with torch.inference_mode(), torch_threads(scenario.threads):
        for run in range(runs + 1):
            for name, model in models.items():
                started = {clock: now() for clock, now in CLOCKS.items()}
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=scenario.decode_len,
                    min_new_tokens=scenario.decode_len, do_sample=False, pad_token_id=0,
                )
                ended = {clock: now() for clock, now in CLOCKS.items()}
                assert out.shape[1] == scenario.prefill_len + scenario.decode_len
                for clock in CLOCKS:
                    if run:
                        times[name][clock].append((ended[clock] - started[clock]) * 1e3)
    return times


def measured_part(args, registries) -> dict:
    family, parent = load_parent(ParentSection(source=args.parent), registries)
    shape = parent.shape
    scenario = Scenario(batch_size=args.batch, prefill_len=args.prefill, decode_len=args.decode, dtype="fp32",
                        kv_dtype="fp32", device="cpu", threads=args.threads)
    options = MeasuredOptions(layers=args.layers, repeats=args.repeats, clock=args.clock, statistic=args.statistic,
                              cache=args.use_cache)
    model = MeasuredCostModel(options)
    print(f"measured costs ({scenario}; {options})...", flush=True)
    started = time.perf_counter()
    fixed = model.fixed_costs(shape, scenario, family)
    offered = [*shape.blocks, *(BlockSpec.parse(b) for recipe in RECIPES.values() for b in recipe)]
    costs = {b.id: model.block_costs(shape, b, scenario, family) for b in dict.fromkeys(offered)}
    costing_s = time.perf_counter() - started
    for block_id, cost in {"fixed": fixed, **costs}.items():
        print(f"  {block_id:24s} {cost['runtime_ms']:9.2f} ms", flush=True)
    children = {"parent": list(shape.blocks)}
    for recipe, target in TARGETS:
        children[f"{recipe}~{target}x"] = choose_child(
            shape.blocks, RECIPES[recipe], target, lambda blocks: predicted_ms(fixed, costs, blocks)
        )
    models = {name: parent.model if name == "parent" else family.build_child(parent, blocks).model
              for name, blocks in children.items()}
    print(f"running {len(models)} models end to end ({args.runs} runs each + 1 warm-up)...", flush=True)
    started = time.perf_counter()
    times = time_generate(models, scenario, args.runs)
    e2e_s = time.perf_counter() - started
    summary = STATISTICS[args.statistic]

    def measured_ms(name: str, clock: str = args.clock) -> float:
        return summary(times[name][clock])

    rows = []
    for name, blocks in children.items():
        row = {
            "child": name,
            "blocks": {b.id: sum(1 for x in blocks if x == b) for b in dict.fromkeys(blocks)},
            "predicted_ms": predicted_ms(fixed, costs, blocks),
            "measured_ms": measured_ms(name),
            "runs_ms": times[name],
            "predicted_speedup": predicted_ms(fixed, costs, children["parent"]) / predicted_ms(fixed, costs, blocks),
            "measured_speedup": measured_ms("parent") / measured_ms(name),
            "measured_speedup_wall": measured_ms("parent", "wall") / measured_ms(name, "wall"),
        }
        row["speedup_error"] = row["predicted_speedup"] / row["measured_speedup"] - 1
        rows.append(row)
    return {
        "parent": args.parent,
        "scenario": attrs.asdict(scenario),
        "options": attrs.asdict(options),
        "fixed": fixed,
        "block_costs": costs,
        "children": rows,
        "costing_seconds": costing_s,
        "end_to_end_seconds": e2e_s,
    }


def print_measured(part: dict) -> None:
    options = part["options"]
    print()
    print(f"measured cost model vs end-to-end generate ({options['clock']} clock, {options['statistic']} of the runs; "
          f"'wall x': wall-clock speedup of the same runs)")
    print(f"{'child':14s} {'pred ms':>9s} {'meas ms':>9s} {'pred x':>7s} {'meas x':>7s} {'error':>7s} {'wall x':>7s}  blocks")
    for row in part["children"]:
        mix = ", ".join(f"{n}x {b}" for b, n in row["blocks"].items())
        print(f"{row['child']:14s} {row['predicted_ms']:9.1f} {row['measured_ms']:9.1f} "
              f"{row['predicted_speedup']:6.2f}x {row['measured_speedup']:6.2f}x {row['speedup_error']:+7.1%} "
              f"{row['measured_speedup_wall']:6.2f}x  {mix}")


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
    fixed = model.fixed_costs(shape, scenario, None)
    costs = {b.id: model.block_costs(shape, b, scenario, None) for b in dict.fromkeys(shape.blocks)}
    total = {k: fixed[k] + sum(costs[b.id][k] for b in shape.blocks) for k in ("runtime_ms", "memory_mib", "num_params")}
    return {**total, "fixed_ms": fixed["runtime_ms"], "weights_mib": fixed["memory_mib"] - fixed["kv_cache_mib"]
            + sum(costs[b.id]["memory_mib"] - costs[b.id]["kv_cache_mib"] for b in shape.blocks)}


def max_batch(model, shape, scenario, limit: int) -> int:
    """Largest batch whose weights + KV cache fit the GPU (0: not even batch 1)."""
    capacity = model.memory_capacity_mib(scenario)
    one = totals(model, shape, attrs.evolve(scenario, batch_size=1))
    kv_per_sequence = one["memory_mib"] - one["weights_mib"]
    room = capacity - one["weights_mib"]
    return 0 if room < kv_per_sequence else min(limit, int(room // kv_per_sequence))


def throughput(model, shape, scenario, limit: int) -> dict:
    batch = max_batch(model, shape, scenario, limit)
    if not batch:
        return {"batch": 0, "tokens_per_s": 0.0}
    run = totals(model, shape, attrs.evolve(scenario, batch_size=batch))
    return {"batch": batch, "tokens_per_s": batch * scenario.decode_len / (run["runtime_ms"] / 1e3)}


def tensor_parallel(gpu: GPUSpec, ways: int) -> GPUSpec:
    """``ways`` GPUs as one with pooled memory, bandwidth and compute (communication ignored)."""
    return GPUSpec(name=f"{ways}x {gpu.name}", memory_gib=gpu.memory_gib * ways, bandwidth_gbs=gpu.bandwidth_gbs * ways,
                   peak_tflops={k: v * ways for k, v in gpu.peak_tflops.items()}, source=gpu.source)


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
    h100 = registries.cost_models.get("h100")
    h100_model = h100.create()
    parent, child = shapes["llama-3.1-70b"], shapes["nemotron-51b"]
    equal_batch = []
    for batch in (1, 8, 64, 256):
        scenario = attrs.evolve(paper, batch_size=batch)
        p, c = totals(h100_model, parent, scenario), totals(h100_model, child, scenario)
        equal_batch.append({"batch": batch, "parent_ms": p["runtime_ms"], "child_ms": c["runtime_ms"],
                            "speedup": p["runtime_ms"] / c["runtime_ms"]})
    child_one = throughput(h100_model, child, paper, args.max_batch)
    parent_tp = {}
    for ways in (1, 2, 4, 8):
        pooled = RooflineCostModel(tensor_parallel(h100_model.gpu, ways), h100_model.options)
        run = throughput(pooled, parent, paper, args.max_batch * ways)
        parent_tp[ways] = {**run, "tokens_per_s_per_gpu": run["tokens_per_s"] / ways}
    best_ways = max(parent_tp, key=lambda w: parent_tp[w]["tokens_per_s_per_gpu"])
    return {
        "scenario": attrs.asdict(paper),
        "per_layer": per_layer,
        "nemotron_source": nemotron_source,
        "params": {name: totals(h100_model, s, paper)["num_params"] for name, s in shapes.items()},
        "equal_batch": equal_batch,
        "child_one_gpu": child_one,
        "parent_tensor_parallel": parent_tp,
        "speedup_vs_parent_one_gpu": child_one["tokens_per_s"] / max(parent_tp[1]["tokens_per_s"], 1e-9),
        "speedup_vs_parent_best_tp": child_one["tokens_per_s"] / parent_tp[best_ways]["tokens_per_s_per_gpu"],
        "parent_best_tp": best_ways,
        "paper": {**PAPER, "speedup_best_tp": PAPER["child_tokens_per_s"] / PAPER["parent_tokens_per_s_best_tp"],
                  "speedup_one_gpu": PAPER["child_tokens_per_s"] / PAPER["parent_tokens_per_s_one_gpu"]},
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
    child = part["child_one_gpu"]
    print(f"  largest batch that fits: child {child['batch']} -> {child['tokens_per_s']:.0f} tokens/s")
    for ways, r in part["parent_tensor_parallel"].items():
        print(f"  parent on {ways} GPU(s) (ideal tensor parallelism, no communication): batch {r['batch']} -> "
              f"{r['tokens_per_s_per_gpu']:.0f} tokens/s per GPU")
    paper = part["paper"]
    print(f"  predicted throughput speedup: {part['speedup_vs_parent_best_tp']:.2f}x vs the parent on its best GPU count "
          f"({part['parent_best_tp']}; paper {paper['speedup_best_tp']:.2f}x), {part['speedup_vs_parent_one_gpu']:.2f}x vs "
          f"the parent on one GPU (blog {paper['speedup_one_gpu']:.2f}x)")


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
