"""Benchmark: blockwise local distillation (BLD) on the SmolLM2-135M parent.

1. **Full build** (the integration run): ``puzzle run --stage library`` builds the whole
   decoupled library (all 30 layers, every default variant) with a small token budget,
   in a child process whose peak RSS is read back (``RUSAGE_CHILDREN``). It is compared
   with the parent's fp32 size plus one layer's activation shard, after subtracting the
   RSS of an interpreter that has imported the same libraries but loaded no model. The
   per-job RSS high-water marks (reset at each job) are compared across layers: flat
   means memory does not grow with the number of layers.
2. **Throughput**: for sampled units, BLD's training loop (reading shards, bf16 -> fp32,
   context, loss, AdamW, cosine schedule, finiteness checks) against a bare loop over the
   same module with the same batch shape on tensors already in memory: forward + loss +
   backward + AdamW step, and forward + backward alone. Tokens per *CPU second* of this
   process (single thread), fastest of ``--repeats``, so other users' load does not skew
   the ratio.
3. **torchrun vs local**: the same BLD job list (a reduced variant set, activations
   shared by hard links so only the jobs differ) with ``local`` (1 thread) and
   ``torchrun`` (2 processes x 1 thread); wall-clock speedup.

    .venv/bin/python benchmarks/bld.py [--tokens 4096] [--heldout-tokens 1024] [--threads 1]
                                       [--run-root runs/bench-bld] [--skip-build] [--skip-speedup]

Writes ``benchmarks/results/bld.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from puzzle_core.bld import BLDTrainer, Unit, job_seed, unit_cost, unit_inputs
from puzzle_core.config import structure
from puzzle_core.interfaces import Job
from puzzle_core.pipeline import RunContext
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.schema import PuzzleConfig
from puzzle_plugins.torchrun_executor import balanced_shares

RESULTS = Path(__file__).parent / "results" / "bld.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", default="smollm2-135m")
    parser.add_argument("--corpus", default="demo")
    parser.add_argument("--tokens", type=int, default=4096, help="training tokens per block")
    parser.add_argument("--heldout-tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the full build")
    parser.add_argument("--layer", type=int, default=15, help="layer of the throughput samples")
    parser.add_argument("--units", default="attn_g9,attn_linear,ffn_1152,ffn_384,ffn_linear",
                        help="variant ids timed for throughput (comma-separated)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench-bld"))
    parser.add_argument("--skip-build", action="store_true", help="reuse the full build in --run-root")
    parser.add_argument("--skip-speedup", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def run_config(args, executor, threads: int, variants: dict | None = None) -> dict:
    library = {
        "tokens": args.tokens,
        "heldout_tokens": args.heldout_tokens,
        "calibration_tokens": args.tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "shard_tokens": args.tokens,
        "executor": executor,
    }
    if variants is not None:
        library["variants"] = {"name": "llama", **variants}
    return {"parent": {"source": args.parent}, "seed": 0, "threads": threads,
            "data": {"corpus": args.corpus, "seq_len": args.seq_len}, "library": library}


def run_stage(config: dict, run_dir: Path) -> dict:
    """``puzzle run --stage library`` in a child process: wall time and the children's peak RSS."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "puzzle_core.cli", "run", str(path), "--stage", "library"]
    command += ["--run-dir", str(run_dir), "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return {"wall_s": time.perf_counter() - started,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def baseline_rss_mib() -> float:
    """Peak RSS of an interpreter that imports what a run imports, without loading a model."""
    code = ("import resource, torch, transformers, puzzle_core.cli, puzzle_core.bld, puzzle_core.activations;"
            "from puzzle_core.registry import get_registries; get_registries();"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def index_records(run_dir: Path) -> list[dict]:
    index = json.loads((run_dir / "library" / "index.json").read_text())
    return [record for layer in index["layers"] for record in layer["trained"].values()]


def full_build(args, ctx_parent_bytes: int, hidden: int) -> dict:
    run_dir = args.run_root / "full"
    if args.skip_build:
        measured = json.loads((run_dir / "measured.json").read_text())
    else:
        measured = run_stage(run_config(args, {"name": "local"}, args.threads), run_dir)
        atomic_write_json(run_dir / "measured.json", measured)
    records = index_records(run_dir)
    shard_bytes = args.tokens * hidden * 3 * 2  # one layer of one shard: hidden, attn_out, ffn_out in bf16
    baseline = baseline_rss_mib()
    by_layer: dict[int, list[float]] = {}
    for record in records:
        by_layer.setdefault(record["layer"], []).append(record["peak_memory_mib"])
    layers = sorted(by_layer)
    first, last = layers[: len(layers) // 3], layers[-(len(layers) // 3) :]
    return {
        "jobs": len(records),
        "layers": len(layers),
        "tokens_per_job": records[0]["tokens"],
        "wall_s": measured["wall_s"],
        "job_wall_s_mean": sum(r["wall_s"] for r in records) / len(records),
        "peak_rss_mib": measured["peak_rss_mib"],
        "baseline_rss_mib": baseline,
        "peak_rss_above_baseline_mib": measured["peak_rss_mib"] - baseline,
        "parent_fp32_mib": ctx_parent_bytes / 2**20,
        "layer_shard_mib": shard_bytes / 2**20,
        "job_peak_rss_mib_first_third": max(v for i in first for v in by_layer[i]),
        "job_peak_rss_mib_last_third": max(v for i in last for v in by_layer[i]),
        "heldout_improved": sum(1 for r in records if r["heldout_loss_after"] < r["heldout_loss_before"]),
        "bld_tokens_per_s_mean": sum(r["train_tokens_per_s"] for r in records) / len(records),
    }


def bare_tokens_per_cpu_s(trainer: BLDTrainer, unit: Unit, steps: int, optimizer_step: bool) -> float:
    """Tokens per CPU second of a loop over in-memory tensors of BLD's batch shape."""
    torch.manual_seed(job_seed(0, unit.id))
    module = trainer.build(unit).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batch = next(trainer.store.batches(unit.layer, "train", trainer.settings.batch_size))
    inputs, target = unit_inputs(unit, batch, torch.device("cpu"))
    context = trainer.context(inputs)
    started = time.process_time()
    for _ in range(steps):
        loss = trainer.loss(module(inputs, context), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer_step:
            optimizer.step()
    return steps * inputs.numel() // inputs.shape[-1] / (time.process_time() - started)


def throughput(args, ctx: RunContext, store_trainer: BLDTrainer) -> list[dict]:
    """BLD's training loop vs bare loops, per sampled unit (fastest of ``--repeats``)."""
    scratch = RunDir(args.run_root / "throughput")
    trainer = BLDTrainer(scratch, ctx.family, ctx.parent, store_trainer.store, store_trainer.settings,
                         store_trainer.loss, torch.device("cpu"))
    steps = trainer.store.steps("train", args.batch_size)
    rows = []
    for name in args.units.split(","):
        unit = Unit(args.layer, attention=name) if name.startswith("attn") else Unit(args.layer, ffn=name)
        bld, full, fwd_bwd = [], [], []
        for _ in range(args.repeats):
            shutil.rmtree(scratch.root, ignore_errors=True)
            trainer.run(Job(unit.id, 1.0, unit))
            record = json.loads(trainer.record_path(unit).read_text())
            bld.append(record["tokens"] / record["train_cpu_s"])
            full.append(bare_tokens_per_cpu_s(trainer, unit, steps, optimizer_step=True))
            fwd_bwd.append(bare_tokens_per_cpu_s(trainer, unit, steps, optimizer_step=False))
        rows.append({"unit": unit.id, "steps": steps, "bld_tokens_per_cpu_s": max(bld),
                     "bare_step_tokens_per_cpu_s": max(full), "bare_fwd_bwd_tokens_per_cpu_s": max(fwd_bwd),
                     "ratio_vs_bare_step": max(bld) / max(full), "ratio_vs_bare_fwd_bwd": max(bld) / max(fwd_bwd)})
    return rows


def speedup(args, trainer: BLDTrainer) -> dict:
    """The same BLD job list with local (1 thread) and torchrun (2 x 1 thread).

    Besides wall time, which on a shared machine mostly measures other users' load, the
    CPU seconds of every job give the speedup two idle cores would show: the local run's
    total over the busier rank's share (shares recomputed exactly as the executor splits).
    """
    variants = {"ffn_fractions": [0.5], "include_linear": False, "include_no_op": True}
    source = next((args.run_root / "full" / "activations").iterdir())
    timings, cpu = {}, {}
    for name, executor in (("local", {"name": "local", "threads": 1}),
                           ("torchrun", {"name": "torchrun", "nproc": 2, "threads": 1})):
        run_dir = args.run_root / f"speedup-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        target = run_dir / "activations" / source.name
        shutil.copytree(source, target, copy_function=os.link)  # the same captured activations, no copy
        timings[name] = run_stage(run_config(args, executor, 1, variants), run_dir)["wall_s"]
        cpu[name] = {record["job"]: record["cpu_s"] for record in index_records(run_dir)}
    units = [Unit(r["layer"], r["attention"], r["ffn"]) for r in index_records(args.run_root / "speedup-torchrun")]
    jobs = [Job(u.id, unit_cost(trainer.parent.shape, u, args.seq_len, trainer.store.tokens("train"))) for u in units]
    ranks = [sum(cpu["torchrun"][job.id] for job in share) for share in balanced_shares(jobs, 2)]
    local_cpu = sum(cpu["local"].values())
    return {"jobs": len(jobs), "local_wall_s": timings["local"], "torchrun_wall_s": timings["torchrun"],
            "speedup": timings["local"] / timings["torchrun"], "load_average": os.getloadavg(),
            "local_job_cpu_s": local_cpu, "torchrun_rank_job_cpu_s": ranks,
            "cpu_speedup": local_cpu / max(ranks)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    config = structure(run_config(args, {"name": "local"}, args.threads), PuzzleConfig)
    ctx = RunContext(config, RunDir(args.run_root / "full"))
    parent_bytes = sum(p.numel() * p.element_size() for p in ctx.parent.model.parameters())
    build = full_build(args, parent_bytes, ctx.parent.shape.hidden_size)

    from puzzle_core.stages.library import library_parts

    store, settings, loss = library_parts(ctx)
    trainer = BLDTrainer(ctx.run_dir, ctx.family, ctx.parent, store, settings, loss, torch.device("cpu"))
    rows = throughput(args, ctx, trainer)
    spread = None if args.skip_speedup else speedup(args, trainer)

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "load_average": os.getloadavg()},
               "settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
               "full_build": build, "throughput": rows, "torchrun_vs_local": spread}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)

    print(f"\nFull decoupled library, {args.parent}: {build['jobs']} jobs over {build['layers']} layers, "
          f"{build['tokens_per_job']} tokens per job, {build['wall_s']:.0f} s wall "
          f"({build['job_wall_s_mean']:.2f} s per job)")
    print(f"  peak RSS {build['peak_rss_mib']:.0f} MiB = {build['baseline_rss_mib']:.0f} (interpreter + libraries) + "
          f"{build['peak_rss_above_baseline_mib']:.0f}; parent fp32 {build['parent_fp32_mib']:.0f} MiB + one layer's "
          f"shard {build['layer_shard_mib']:.1f} MiB = {build['parent_fp32_mib'] + build['layer_shard_mib']:.0f} MiB")
    print(f"  per-job peak RSS, first third of layers {build['job_peak_rss_mib_first_third']:.0f} MiB, last third "
          f"{build['job_peak_rss_mib_last_third']:.0f} MiB; held-out loss improved in {build['heldout_improved']}/"
          f"{build['jobs']} jobs")
    print(f"\n{'unit':<22}{'BLD tok/cpu-s':>15}{'bare step':>12}{'bare f+b':>12}{'ratio step':>12}{'ratio f+b':>11}")
    for row in rows:
        print(f"{row['unit']:<22}{row['bld_tokens_per_cpu_s']:>15.0f}{row['bare_step_tokens_per_cpu_s']:>12.0f}"
              f"{row['bare_fwd_bwd_tokens_per_cpu_s']:>12.0f}{row['ratio_vs_bare_step']:>12.2f}"
              f"{row['ratio_vs_bare_fwd_bwd']:>11.2f}")
    if spread:
        print(f"\ntorchrun 2x1 thread vs local 1 thread, {spread['jobs']} jobs: {spread['local_wall_s']:.0f} s -> "
              f"{spread['torchrun_wall_s']:.0f} s wall, speedup {spread['speedup']:.2f}x (load average "
              f"{spread['load_average'][0]:.1f} on {os.cpu_count()} CPUs); by job CPU seconds: "
              f"{spread['local_job_cpu_s']:.0f} s "
              f"-> ranks {' / '.join(f'{c:.0f}' for c in spread['torchrun_rank_job_cpu_s'])} s, "
              f"{spread['cpu_speedup']:.2f}x projected for two idle cores")
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
