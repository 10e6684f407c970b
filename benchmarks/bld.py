"""Benchmark: blockwise local distillation (BLD) on the SmolLM2-135M parent.

``--part build`` (default; writes ``results/bld.json``):

1. **Full build** (the integration run): ``puzzle run --stage library`` builds the whole
   decoupled library (all 30 layers, every default variant) with a small token budget,
   in a child process whose peak RSS is read back (``RUSAGE_CHILDREN``). It is compared
   with the parent's fp32 size plus one layer's activation shard, after subtracting the
   RSS of an interpreter that has imported the same libraries but loaded no model. The
   per-pass RSS high-water marks (reset at each pass) are compared across layers: flat
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

``--part stage`` (writes ``results/bld_stage.json``): the demo's library stage
(``configs/demo.yaml``, 30 layers x 3 trained variants = 90 units) at each of
``--stage-tokens`` tokens per block, once per *arm* (``--arms``: one unit per job as
before the one-pass trainer, one pass per layer, bf16 autocast, two torchrun processes of
one thread). The activations are captured once per budget and executor kind (timed on
their own) and hard-linked into every arm, so an arm's time is its BLD alone. Per arm:
wall and CPU seconds of the stage, and per unit its own training tokens per CPU second.

``--part sweep`` (writes ``results/bld_sweep.json``): held-out normalised MSE of a few
layers' variants (``--sweep-layers``, ``--sweep-units``) after BLD, against tokens per
block (``--sweep-tokens``), learning rate (``--sweep-lrs``), init method
(``--sweep-inits``) and bf16 autocast; one pass per layer and setting on activations
captured once (only the swept layers are stored), so settings differ in nothing else.

    .venv/bin/python benchmarks/bld.py [--part build] [--tokens 4096] [--threads 1] [--skip-build] [--skip-speedup]
    .venv/bin/python benchmarks/bld.py --part stage [--stage-tokens 8192,32768,65536] [--arms ...]
    .venv/bin/python benchmarks/bld.py --part sweep [--sweep-layers 3,10,17,24] [--sweep-tokens ...]

Prints a table per part. Timings on a shared machine are noisy: every result records the
load average, and CPU seconds are given next to wall seconds.
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

import attrs
import torch
import yaml
from safetensors.torch import save_file
from tqdm.auto import tqdm

from puzzle_core import layout
from puzzle_core.bld import BLDTrainer, Unit, UnitPass, job_seed, unit_cost, unit_inputs
from puzzle_core.activations import ActivationStore
from puzzle_core.config import structure, unstructure
from puzzle_core.interfaces import Job
from puzzle_core.pipeline import RunContext
from puzzle_core.rundir import RunDir, atomic_path, atomic_write_json, link_missing
from puzzle_core.schema import PuzzleConfig
from puzzle_plugins.torchrun_executor import balanced_shares

RESULTS = Path(__file__).parent / "results" / "bld.json"
STAGE_RESULTS = Path(__file__).parent / "results" / "bld_stage.json"
SWEEP_RESULTS = Path(__file__).parent / "results" / "bld_sweep.json"
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# library overlays compared by --part stage
TORCHRUN = {"name": "torchrun", "nproc": 2, "threads": 1}
ARMS = {
    "one_unit": {"units_per_pass": 1},  # a job per unit, as before the one-pass trainer
    "one_pass": {},
    "one_pass_bf16": {"bf16": True},
    "one_unit_torchrun": {"units_per_pass": 1, "executor": TORCHRUN},
    "one_pass_torchrun": {"executor": TORCHRUN},
    "one_pass_bf16_torchrun": {"bf16": True, "executor": TORCHRUN},
}
RESULT_KEYS = {"stage": {"captures": ("tokens", "executor"), "arms": ("tokens", "arm")},
               "sweep": {"rows": ("sweep", "layer", "unit", "setting")}}  # what identifies a row, for merging
NOTHING_TO_TRAIN = {"name": "llama", "ffn_fractions": [], "include_gqa": False, "include_linear": False,
                    "include_no_op": False}  # a library stage that only captures activations


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("build", "stage", "sweep"), default="build")
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
    parser.add_argument("--out", type=Path, default=None, help="results file (default: per part)")
    stage = parser.add_argument_group("--part stage")
    stage.add_argument("--config", type=Path, default=DEMO, help="base config whose library stage is timed")
    stage.add_argument("--stage-tokens", type=_ints, default=[8192, 32768, 65536])
    stage.add_argument("--arms", type=lambda text: text.split(","), default=list(ARMS),
                       help=f"comma-separated, of {', '.join(ARMS)}")
    sweep = parser.add_argument_group("--part sweep")
    sweep.add_argument("--sweeps", type=lambda text: text.split(","), default=["tokens", "lr", "init", "precision"],
                       help="which sweeps to run (their rows replace earlier ones in the results file)")
    sweep.add_argument("--tag", default="", help="appended to the sweep names (another base setting's rows)")
    sweep.add_argument("--sweep-layers", type=_ints, default=[3, 10, 17, 24])
    sweep.add_argument("--sweep-units", default="attn_g9,ffn_768,ffn_384")
    sweep.add_argument("--sweep-tokens", type=_ints, default=[8192, 32768, 65536, 131072])
    sweep.add_argument("--sweep-lrs", type=lambda text: [float(v) for v in text.split(",")],
                       default=[3e-4, 1e-3, 3e-3, 1e-2])
    sweep.add_argument("--sweep-lr-tokens", type=int, default=32768, help="tokens per block of the lr sweep")
    sweep.add_argument("--sweep-inits", default="attention=mean_kv,attention=fitted_kv,attention=first_kv,"
                       "ffn=activations,ffn=contribution,ffn=weight_norm",
                       help="init methods compared (each sets one part's method)")
    sweep.add_argument("--sweep-init-tokens", type=_ints, default=[8192, 65536], help="tokens per block, init sweep")
    sweep.add_argument("--sweep-heldout-tokens", type=int, default=4096)
    sweep.add_argument("--lr-base", type=float, default=1e-3, help="lr of the sweeps that do not vary it")
    sweep.add_argument("--init-base", default="default", help="init method of the sweeps that do not vary it")
    args = parser.parse_args()
    if args.out is None:
        args.out = {"build": RESULTS, "stage": STAGE_RESULTS, "sweep": SWEEP_RESULTS}[args.part]
    return args


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


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
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "peak_rss_mib": after.ru_maxrss / 1024, "load_average_before": load, "load_average_after": os.getloadavg()}


def baseline_rss_mib() -> float:
    """Peak RSS of an interpreter that imports what a run imports, without loading a model."""
    code = ("import resource, torch, transformers, puzzle_core.cli, puzzle_core.bld, puzzle_core.activations;"
            "from puzzle_core.registry import get_registries; get_registries();"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def index_records(run_dir: Path) -> list[dict]:
    """Every trained unit's record in the run's library index, as the result rows store them."""
    index = layout.read_library_index(RunDir(run_dir), required=True)
    return [unstructure(record) for layer in index.layers for record in layer.trained.values()]


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
            trainer.run(Job(unit.id, 1.0, UnitPass(unit.layer, (unit,))))
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
    source = next(layout.activations_dir(RunDir(args.run_root / "full")).iterdir())
    timings, cpu = {}, {}
    for name, executor in (("local", {"name": "local", "threads": 1}),
                           ("torchrun", {"name": "torchrun", "nproc": 2, "threads": 1})):
        run_dir = args.run_root / f"speedup-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        target = layout.activations_dir(RunDir(run_dir), source.name)
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


# ---------------------------------------------------------------------------- --part sweep


def capture_layers(store: ActivationStore, runner, layers: list[int]) -> None:
    """Like :meth:`ActivationStore.capture`, but only ``layers`` are written (the sweep trains nothing else)."""
    dtype = torch.bfloat16 if store.settings.dtype == "bfloat16" else torch.float32
    for shard in tqdm(store.shards, desc="capturing swept layers", unit="shard"):
        if all(store.layer_file(layer, shard).is_file() for layer in layers):
            continue
        with torch.inference_mode():
            hidden = runner.embed(shard.input_ids)
            context = runner.context(hidden)
            for layer in range(max(layers) + 1):
                attn_out = runner.sublayer(layer, "attention")(hidden, context)
                ffn_out = runner.sublayer(layer, "ffn")(hidden + attn_out, context)
                if layer in layers:
                    tensors = {"hidden": hidden, "attn_out": attn_out, "ffn_out": ffn_out}
                    with atomic_path(store.layer_file(layer, shard)) as tmp:
                        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp))
                hidden = hidden + attn_out + ffn_out


def sweep_settings(args) -> list[dict]:
    """Every (sweep, setting) trained: tokens, lr, init method and bf16 autocast, one changed at a time."""
    units = args.sweep_units.split(",")
    base = {"tokens": args.sweep_lr_tokens, "lr": args.lr_base, "init": args.init_base, "bf16": False, "units": units}
    settings = [{**base, "sweep": "tokens", "setting": tokens, "tokens": tokens} for tokens in args.sweep_tokens]
    settings += [{**base, "sweep": "lr", "setting": lr, "lr": lr} for lr in args.sweep_lrs]
    for tokens in args.sweep_init_tokens:
        for method in args.sweep_inits.split(","):
            part = method.partition("=")[0]
            chosen = [u for u in units if u.startswith("attn") == (part == "attention")]
            settings.append({**base, "sweep": "init", "setting": f"{method} @{tokens}", "init": method,
                             "units": chosen, "tokens": tokens})
    settings.append({**base, "sweep": "precision", "setting": "bf16", "bf16": True, "tokens": max(args.sweep_tokens)})
    chosen = [setting for setting in settings if setting["sweep"] in args.sweeps]
    return [{**setting, "sweep": f"{setting['sweep']}{args.tag}"} for setting in chosen]


def sweep_part(args) -> dict:
    """Held-out normalised MSE after BLD of the swept layers' units, one setting changed at a time."""
    import copy

    from puzzle_core.activations import ActivationStore, CaptureSettings
    from puzzle_core.bld import TrainSettings
    from puzzle_core.api import InitMethods

    config = structure(run_config(args, {"name": "local"}, args.threads), PuzzleConfig)
    config = attrs.evolve(config, library=attrs.evolve(
        config.library, tokens=max(args.sweep_tokens), heldout_tokens=args.sweep_heldout_tokens,
        shard_tokens=8192, calibration_tokens=1024, batch_size=8))
    ctx = RunContext(config, RunDir(args.run_root / "sweep"))
    store = ActivationStore(ctx.run_dir, CaptureSettings.from_config(config), ctx.parent.shape.num_layers)
    store.plan(ctx.corpus)
    torch.set_num_threads(max(1, args.threads))
    capture_layers(store, ctx.family.layer_runner(ctx.parent.model), args.sweep_layers)
    torch.set_num_threads(1)
    loss = ctx.create(config.library.loss)
    train_shards, heldout = store.split_shards("train"), store.split_shards("heldout")
    rows = []
    for setting in sweep_settings(args):
        view = copy.copy(store)  # the first shards of the stream: budgets are nested
        view.shards = train_shards[: max(1, setting["tokens"] // store.settings.shard_tokens)] + heldout
        init = "default" if setting["init"] == "default" else str(InitMethods.parse(setting["init"]))
        settings = TrainSettings(activations=store.settings.key, mode="decoupled",
                                 loss=unstructure(config.library.loss), lr=setting["lr"], weight_decay=0.0,
                                 warmup_fraction=0.05, batch_size=8, calibration_tokens=1024, init_method=init, seed=0,
                                 bf16=setting["bf16"])
        scratch = RunDir(args.run_root / "sweep-scratch")
        trainer = BLDTrainer(scratch, ctx.family, ctx.parent, view, settings, loss, torch.device("cpu"))
        for layer in args.sweep_layers:
            units = tuple(Unit(layer, attention=u) if u.startswith("attn") else Unit(layer, ffn=u)
                          for u in setting["units"])
            shutil.rmtree(scratch.root, ignore_errors=True)
            trainer.run(Job(f"sweep/{layer}", 1.0, UnitPass(layer, units)))
            for unit in units:
                record = json.loads(trainer.record_path(unit).read_text())
                rows.append({"sweep": setting["sweep"], "setting": setting["setting"], "layer": layer,
                             "unit": unit.name, "tokens": record["tokens"], "lr": setting["lr"], "init": init, "bf16": setting["bf16"],
                             "heldout_before": record["heldout_loss_before"],
                             "heldout_after": record["heldout_loss_after"], "train_cpu_s": record["train_cpu_s"],
                             "tokens_per_cpu_s": record["tokens"] / record["train_cpu_s"]})
        print(f"{setting['sweep']} {setting['setting']}: done", flush=True)
        save_rows(args, {"heldout_tokens": store.tokens("heldout"), "rows": rows})
    shutil.rmtree(args.run_root / "sweep-scratch", ignore_errors=True)
    return save_rows(args, {"heldout_tokens": store.tokens("heldout"), "rows": rows})


def print_sweep(results: dict) -> None:
    rows = results["rows"]
    units = sorted({(r["layer"], r["unit"]) for r in rows})
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        chosen = [r for r in rows if r["sweep"] == sweep]
        if not chosen:
            continue
        if sweep.startswith("precision"):  # next to the float32 run of the same budget (from the tokens sweep)
            tokens_sweep = sweep.replace("precision", "tokens")
            chosen = [{**r, "setting": "fp32"} for r in rows if r["sweep"] == tokens_sweep and not r["bf16"]
                      and r["tokens"] == chosen[0]["tokens"]] + chosen
        settings = list(dict.fromkeys(r["setting"] for r in chosen))
        print(f"\nheld-out normalised MSE after BLD, by {sweep} ({results['heldout_tokens']} held-out tokens)")
        print(f"{'layer/unit':<18}{'init':>9}" + "".join(f"{str(s):>22}" for s in settings))
        for layer, unit in units:
            cells = {r["setting"]: r for r in chosen if (r["layer"], r["unit"]) == (layer, unit)}
            if not cells:
                continue
            before = next(iter(cells.values()))["heldout_before"]
            line = "".join(f"{cells[s]['heldout_after']:>22.4f}" if s in cells else f"{'':>22}" for s in settings)
            if sweep.startswith("init"):  # the init methods differ before training too
                line = "".join(f"{cells[s]['heldout_before']:>11.4f}->{cells[s]['heldout_after']:<9.4f}"
                               if s in cells else f"{'':>22}" for s in settings)
            print(f"{layer:>3} {unit:<14}{before:>9.4f}{line}")
    plot_sweep(results, SWEEP_RESULTS.with_suffix(".png"))


def plot_sweep(results: dict, path: Path) -> None:
    """Held-out NMSE vs tokens per block and vs lr, one line per (layer, unit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    tags = sorted({r["sweep"][len("tokens"):] for r in rows if r["sweep"].startswith("tokens")})
    for axis, sweep, label in ((axes[0], "tokens", "training tokens per block"), (axes[1], "lr", "learning rate")):
        for (layer, unit), color in zip(sorted({(r["layer"], r["unit"]) for r in rows}), plt.cm.tab20.colors):
            for tag, style in zip(tags, ("-", "--", ":")):
                points = sorted((r["setting"], r["heldout_after"]) for r in rows
                                if r["sweep"] == sweep + tag and (r["layer"], r["unit"]) == (layer, unit))
                if points:
                    axis.plot(*zip(*points), style, marker="o", color=color,
                              label=f"layer {layer} {unit}{' ' + tag if tag else ''}")
        axis.set(xscale="log", yscale="log", xlabel=label, ylabel="held-out normalised MSE after BLD")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"Wrote {path}")


# ---------------------------------------------------------------------------- --part stage


def demo_config(args, tokens: int, overlay: dict) -> dict:
    config = yaml.safe_load(args.config.read_text())
    config["library"] = {**config["library"], "tokens": tokens, **overlay}
    return config


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def unit_rates(records: list[dict]) -> dict[str, dict]:
    """Per variant: its own training tokens per CPU second over the layers (median, min, max)."""
    rates: dict[str, list[float]] = {}
    for record in records:
        name = "+".join(part for part in (record["attention"], record["ffn"]) if part)
        rates.setdefault(name, []).append(record["tokens"] / record["train_cpu_s"])
    return {name: {"median": _median(v), "min": min(v), "max": max(v)} for name, v in sorted(rates.items())}


def where_time_goes(records: list[dict], measured: dict) -> dict:
    """CPU seconds of the stage split: unit training steps, unit init + held-out evaluation + saving,
    data shared by a pass (reading, calibration slice), and the rest (start-up, parent load, index)."""
    passes = {(r["layer"], r["pass_wall_s"], r["pass_cpu_s"]) for r in records}  # one entry per pass
    train = sum(r["train_cpu_s"] for r in records)
    own = sum(r["cpu_s"] for r in records)
    in_passes = sum(cpu for _, _, cpu in passes)
    return {"train_steps": train, "init_eval_save": own - train, "shared_data": in_passes - own,
            "outside_passes": measured["cpu_s"] - in_passes}


def stage_part(args) -> dict:
    root = args.run_root / "stage"
    rows, captures = [], []
    for tokens in args.stage_tokens:
        captured: dict[str, Path] = {}
        for arm in args.arms:
            overlay = ARMS[arm]
            executor = overlay.get("executor", {"name": "local"})
            if executor["name"] not in captured:  # the activations, captured once by this executor kind
                capture_dir = root / str(tokens) / f"capture-{executor['name']}"
                shutil.rmtree(capture_dir, ignore_errors=True)
                measured = run_stage(demo_config(args, tokens, {"executor": executor, "variants": NOTHING_TO_TRAIN}),
                                     capture_dir)
                captures.append({"tokens": tokens, "executor": executor["name"], **measured})
                save_rows(args, {"captures": captures, "arms": rows})
                captured[executor["name"]] = layout.activations_dir(RunDir(capture_dir))
                print(f"capture {tokens} tokens ({executor['name']}): {measured['wall_s']:.0f} s wall, "
                      f"{measured['cpu_s']:.0f} s CPU", flush=True)
            run_dir = root / str(tokens) / arm
            shutil.rmtree(run_dir, ignore_errors=True)
            link_missing(captured[executor["name"]], layout.activations_dir(RunDir(run_dir)))
            measured = run_stage(demo_config(args, tokens, overlay), run_dir)
            records = index_records(run_dir)
            row = {"tokens": tokens, "arm": arm, "overlay": overlay, "units": len(records), **measured,
                   "cpu_split_s": where_time_goes(records, measured), "unit_tokens_per_cpu_s": unit_rates(records),
                   "heldout_loss_after_mean": sum(r["heldout_loss_after"] for r in records) / len(records)}
            rows.append(row)
            save_rows(args, {"captures": captures, "arms": rows})
            print(f"{tokens:>7} {arm:<24} {row['wall_s']:>7.0f} s wall {row['cpu_s']:>7.0f} s CPU  "
                  f"load {row['load_average_before'][0]:.1f}", flush=True)
    return save_rows(args, {"captures": captures, "arms": rows})


def merge_rows(previous: dict, new: dict, keys: dict[str, tuple[str, ...]]) -> dict:
    """``new``'s rows added to ``previous``'s, replacing rows with the same key (a rerun arm replaces its row)."""
    merged = {k: v for k, v in {**previous, **new}.items() if k not in ("machine", "settings")}
    for name, key in keys.items():
        fresh = {tuple(row[k] for k in key) for row in new[name]}
        kept = [row for row in previous.get(name, []) if tuple(row[k] for k in key) not in fresh]
        merged[name] = sorted(kept + new[name], key=lambda row: tuple(str(row[k]).zfill(12) for k in key))
    return merged


def save_rows(args, results: dict) -> dict:
    """Merge ``results`` into ``args.out``, keeping rows of earlier invocations not rerun; returns the whole."""
    if args.out.is_file():
        results = merge_rows(json.loads(args.out.read_text()), results, RESULT_KEYS[args.part])
    results = {"machine": environment(), "settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
               **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    return results


def print_stage(results: dict) -> None:
    print(f"\n{'tokens':>7} {'arm':<24}{'wall s':>8}{'CPU s':>8}{'load':>6}  {'train':>6}{'init+ev':>8}{'data':>6}"
          f"{'other':>6}   own training tokens / CPU s (median over layers)")
    for row in results["arms"]:
        split = row["cpu_split_s"]
        rates = "  ".join(f"{name} {rate['median']:.0f}" for name, rate in row["unit_tokens_per_cpu_s"].items())
        print(f"{row['tokens']:>7} {row['arm']:<24}{row['wall_s']:>8.0f}{row['cpu_s']:>8.0f}"
              f"{row['load_average_before'][0]:>6.1f}  {split['train_steps']:>6.0f}{split['init_eval_save']:>8.0f}"
              f"{split['shared_data']:>6.0f}{split['outside_passes']:>6.0f}   {rates}")
    for capture in results["captures"]:
        print(f"capture of {capture['tokens']} tokens per block ({capture['executor']}): {capture['wall_s']:.0f} s "
              f"wall, {capture['cpu_s']:.0f} s CPU, load {capture['load_average_before'][0]:.1f}")


def environment() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average": os.getloadavg()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.part in ("stage", "sweep"):
        results = stage_part(args) if args.part == "stage" else sweep_part(args)
        print_stage(results) if args.part == "stage" else print_sweep(results)
        print(f"\nWrote {args.out}")
        return
    config = structure(run_config(args, {"name": "local"}, args.threads), PuzzleConfig)
    ctx = RunContext(config, RunDir(args.run_root / "full"))
    parent_bytes = sum(p.numel() * p.element_size() for p in ctx.parent.model.parameters())
    build = full_build(args, parent_bytes, ctx.parent.shape.hidden_size)

    from puzzle_core.stages.library import library_parts

    store, settings, loss = library_parts(ctx)
    trainer = BLDTrainer(ctx.run_dir, ctx.family, ctx.parent, store, settings, loss, torch.device("cpu"))
    rows = throughput(args, ctx, trainer)
    spread = None if args.skip_speedup else speedup(args, trainer)

    results = {"machine": environment(),
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
