"""Benchmark: global distillation (GKD) on CPU with the SmolLM2-135M parent: speed per setting, and quality.

``--part speed`` (writes ``results/gkd_speed.json``): one GKD optimizer step, exactly as
the stage runs it (:class:`puzzle_core.gkd._Training`: teacher forward, student forward,
cosine + KL, backward, clipping, AdamW), per *setting* (``--settings``: bf16 autocast,
which parameters train, LoRA, and the KL as one full-vocabulary log-softmax as before it
was chunked), next to two references on the same batch: the teacher's forward alone and
a plain training step of the same child (forward, LM loss, backward, AdamW; no teacher).
Tokens per CPU second of this process and per wall second; ``--repeats`` rounds, the
settings interleaved within each round (so a busy spell of the machine hits them all),
median and range over rounds.

``--part quality`` (writes ``results/gkd_quality.json``): a short GKD run
(``--quality-tokens``) per setting from the same BLD-trained child (``--library``, a
run directory whose library holds the child's blocks); KL(parent || child) on the
validation tokens before and after, wall and CPU seconds.

    .venv/bin/python benchmarks/gkd.py --part speed [--library RUN_DIR] [--threads 1] [--repeats 3] [--steps 2]
    .venv/bin/python benchmarks/gkd.py --part quality --library RUN_DIR [--quality-tokens 16384]
        [--config configs/demo.yaml]

``--config`` takes the parent, the text (``gkd.corpus``, else ``data.corpus``), the
sequence length and the GKD section (learning rate, batch, losses, schedule) from a
config; each setting then overlays precision, what trains and LoRA on that section,
from fp32, every parameter trained and no LoRA. Without it the benchmark uses
``--parent``, ``--corpus`` and the GKD defaults at ``--lr``.

The child defaults to the demo's 1.6x MIP child (``--blocks``); without ``--library``
its sub-blocks are initialised from the parent (fine for speed, not for quality).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from puzzle_core import gkd
from puzzle_core.bld import load_sublayers
from puzzle_core.blocks import BlockSpec
from puzzle_core.config import structure, unstructure
from puzzle_core.interfaces import DistillationLoss
from puzzle_core.pipeline import RunContext
from puzzle_core.rundir import RunDir, atomic_write_json
from puzzle_core.schema import GKDSection, PuzzleConfig, load_config

RESULTS = Path(__file__).parent / "results"
# the demo's MIP child at a predicted 1.6x (benchmarks/results/ablations/search.json)
DEMO_CHILD = (
    "attn_g3+ffn_1536,attn_g3+ffn_1536,attn_g3+ffn_1536,attn_g3+ffn_768,attn_noop+ffn_384,attn_noop+ffn_384,"
    "attn_noop+ffn_768,attn_noop+ffn_768,attn_g3+ffn_1536,attn_noop+ffn_768,attn_g3+ffn_768,attn_g3+ffn_768,"
    "attn_g3+ffn_768,attn_g3+ffn_768,attn_g3+ffn_384,attn_g3+ffn_384,attn_g3+ffn_384,attn_noop+ffn_768,"
    "attn_g3+ffn_384,attn_g3+ffn_768,attn_g3+ffn_768,attn_g3+ffn_768,attn_noop+ffn_768,attn_noop+ffn_768,"
    "attn_g3+ffn_768,attn_g3+ffn_384,attn_noop+ffn_768,attn_g3+ffn_768,attn_g9+ffn_768,attn_noop+ffn_768"
)
# gkd section overlays; "full_kl" swaps the chunked KL for autograd through one full log-softmax
SETTINGS = {
    "fp32": {},
    "fp32_full_kl": {"full_kl": True},
    "bf16": {"bf16": True},
    "layers": {"trainable": "layers"},
    "changed": {"trainable": "changed", "trainable_neighbors": 1},
    "changed_only": {"trainable": "changed", "trainable_neighbors": 0},
    "bf16_layers": {"bf16": True, "trainable": "layers"},
    "bf16_changed": {"bf16": True, "trainable": "changed", "trainable_neighbors": 1},
    "lora16": {"lora_rank": 16},
    "bf16_lora16": {"bf16": True, "lora_rank": 16},
}


class FullKL(DistillationLoss):
    """KL(teacher || student) through full-vocabulary float32 log-softmaxes (the loss before it was chunked)."""

    target = "logits"

    def __call__(self, student, teacher, labels=None):
        vocab = student.shape[-1]
        log_student = F.log_softmax(student.float(), dim=-1).reshape(-1, vocab)
        log_teacher = F.log_softmax(teacher.detach().float(), dim=-1).reshape(-1, vocab)
        return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("speed", "quality"), default="speed")
    parser.add_argument("--config", type=Path, default=None,
                        help="parent, text and GKD section from this config (see above); --parent, --corpus, "
                        "--seq-len, --batch-size and --lr then do not apply")
    parser.add_argument("--parent", default="smollm2-135m")
    parser.add_argument("--corpus", default="demo")
    parser.add_argument("--library", type=Path, default=None, help="run directory holding the child's BLD blocks")
    parser.add_argument("--blocks", default=DEMO_CHILD, help="the child: one block id per layer, comma-separated")
    parser.add_argument("--settings", type=lambda text: text.split(","), default=None,
                        help=f"comma-separated, of {', '.join(SETTINGS)} (default: all for speed, a subset for "
                        f"quality)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per setting and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all settings")
    parser.add_argument("--quality-tokens", type=int, default=16384)
    parser.add_argument("--validation-tokens", type=int, default=2048)
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench-gkd"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.settings is None:
        args.settings = list(SETTINGS) if args.part == "speed" else ["bf16", "fp32", "bf16_layers", "bf16_changed",
                                                                     "bf16_lora16"]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    args.out = args.out or RESULTS / f"gkd_{args.part}.json"
    return args


class Bench:
    """The parent, the child's blocks and weights, the data: what every setting shares."""

    def __init__(self, args):
        if args.config:
            config = load_config(args.config)
            self.base = {**unstructure(config.gkd), "bf16": False, "trainable": "all", "lora_rank": 0}
        else:
            config = structure({"parent": {"source": args.parent}, "data": {"corpus": args.corpus,
                                                                             "seq_len": args.seq_len}}, PuzzleConfig)
            self.base = {"batch_size": args.batch_size, "lr": args.lr}
        self.args = args
        self.ctx = RunContext(config, RunDir(args.run_root / "ctx"))
        self.corpus = self.ctx.tokenized(config.distillation_corpus)
        self.seq_len = config.gkd.seq_len or config.data.seq_len
        self.blocks = [BlockSpec.parse(b) for b in args.blocks.split(",")]
        self.sublayers = load_sublayers(args.library, self.blocks) if args.library else None
        self.batch = next(self.corpus.batches("train", self.seq_len, self.base["batch_size"], 10**9, 0))

    def child(self):
        return self.ctx.family.build_child(self.ctx.parent, self.blocks, self.sublayers)

    def section(self, name: str, **extra) -> GKDSection:
        overlay = {k: v for k, v in SETTINGS[name].items() if k != "full_kl"}
        return structure({**self.base, "device": "cpu", **overlay, **extra}, GKDSection)

    def objective(self, name: str, section: GKDSection) -> gkd.DistillationObjective:
        objective = gkd.DistillationObjective.from_config(section, self.ctx.registries)
        if SETTINGS[name].get("full_kl"):
            objective = gkd.DistillationObjective([(n, w, FullKL() if n == "kl" else loss)
                                                   for n, w, loss in objective.terms])
        return objective

    def run(self, name: str, checkpoints: Path, tokens: int) -> gkd.DistillRun:
        return gkd.DistillRun(corpus=self.corpus, seq_len=self.seq_len, seed=0, checkpoint_dir=checkpoints,
                              fingerprint=name, label=f"GKD {name}")


def timed(function, repeat: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``repeat`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        function()
    return time.perf_counter() - wall, time.process_time() - cpu


def warmed_up(bench: Bench, name: str, steps: int) -> tuple[gkd._Training, Iterator[torch.Tensor]]:
    """``name``'s training after one untimed step (first-touch allocations, lazy inits), and a stream of
    ``steps`` more batches."""
    section = bench.section(name, tokens=10**9)
    training = gkd._Training(bench.child(), bench.ctx.parent, bench.ctx.family, bench.objective(name, section),
                             section, bench.run(name, bench.args.run_root / "ckpt", 10**9))
    stream = iter([bench.batch] * (steps + 1))
    training.step(0, stream)
    return training, stream


def speed_round(bench: Bench, names: list[str]) -> dict[str, tuple[float, float]]:
    """One round: seconds per optimizer step (wall, CPU) of every setting and of the two references."""
    args, ids = bench.args, bench.batch
    out = {}
    teacher = gkd.LayerwiseForward(bench.ctx.parent.model, bench.ctx.family).eval()

    def teacher_forward():
        with torch.no_grad():
            teacher(ids, keep_hidden=True)

    teacher_forward()
    out["teacher forward"] = timed(teacher_forward, args.steps)

    child = bench.child()
    forward = gkd.LayerwiseForward(child.model.train(), bench.ctx.family)
    optimizer = torch.optim.AdamW(child.model.parameters(), lr=args.lr)

    def plain_step():
        logits = forward(ids, keep_hidden=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain_step()
    out["plain training step"] = timed(plain_step, args.steps)
    del child, forward, optimizer

    for name in names:
        training, stream = warmed_up(bench, name, args.steps)
        out[name] = timed(lambda: training.step(1, stream), args.steps)
        del training
    return {name: (wall / args.steps, cpu / args.steps) for name, (wall, cpu) in out.items()}


def speed(bench: Bench) -> dict:
    args = bench.args
    tokens = bench.batch.numel()
    rounds = []
    for index in range(args.repeats):
        rounds.append(speed_round(bench, args.settings))
        print(f"round {index + 1}/{args.repeats} done (load {os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for name in rounds[0]:
        walls, cpus = [r[name][0] for r in rounds], [r[name][1] for r in rounds]
        rows.append({"setting": name, "overlay": SETTINGS.get(name, {}), "tokens_per_step": tokens,
                     "cpu_s_per_step": cpus, "wall_s_per_step": walls,
                     "tokens_per_cpu_s": {"median": tokens / statistics.median(cpus), "min": tokens / max(cpus),
                                          "max": tokens / min(cpus)},
                     "tokens_per_s": {"median": tokens / statistics.median(walls), "min": tokens / max(walls),
                                      "max": tokens / min(walls)}})
    return {"rows": rows}


def quality(bench: Bench) -> dict:
    args = bench.args
    warmed_up(bench, args.settings[0], 0)  # the first setting's run must not pay for the process's first steps
    rows = []
    for name in args.settings:
        section = bench.section(name, tokens=args.quality_tokens, validation_tokens=args.validation_tokens,
                                checkpoint_every=10**6)
        checkpoints = args.run_root / "quality" / name
        shutil.rmtree(checkpoints, ignore_errors=True)
        child = bench.child()
        wall, cpu = time.perf_counter(), time.process_time()
        _, log, totals = gkd.distill(child, bench.ctx.parent, bench.ctx.family, bench.objective(name, section),
                                     section, bench.run(name, checkpoints, args.quality_tokens))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append({"setting": name, "overlay": SETTINGS[name], "tokens": totals["tokens"],
                     "kl_before": log.validation[0].kl, "kl_after": log.validation[-1].kl,
                     "train_loss_first": log.train[0].loss, "train_loss_last": log.train[-1].loss,
                     "wall_s": wall, "cpu_s": cpu, "load_average": os.getloadavg()})
        print(f"{name}: KL {rows[-1]['kl_before']:.4f} -> {rows[-1]['kl_after']:.4f}, {wall:.0f} s wall, "
              f"{cpu:.0f} s CPU", flush=True)
    return {"rows": rows}


def _portable(value):
    """Paths as given or relative to the checkout: results must not record a machine's folders."""
    if not isinstance(value, Path):
        return value
    root = Path(__file__).resolve().parents[1]
    return str(value.resolve().relative_to(root)) if value.resolve().is_relative_to(root) else str(value)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    results = speed(bench) if args.part == "speed" else quality(bench)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "load_average": os.getloadavg()},
               "settings": {k: _portable(v) for k, v in vars(args).items()}, **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    if args.part == "speed":
        base = next(r for r in results["rows"] if r["setting"] == "plain training step")
        print(f"\n{'setting':<22}{'tok/CPU-s':>11}{'range':>15}{'tok/s wall':>12}{'vs plain step':>15}")
        for row in results["rows"]:
            rate, wall = row["tokens_per_cpu_s"], row["tokens_per_s"]
            print(f"{row['setting']:<22}{rate['median']:>11.0f}{rate['min']:>8.0f}-{rate['max']:<6.0f}"
                  f"{wall['median']:>12.0f}{rate['median'] / base['tokens_per_cpu_s']['median']:>14.2f}x")
        print(f"\n{args.threads} thread(s), {' x '.join(map(str, bench.batch.shape))} tokens per step, median of "
              f"{args.repeats} rounds of {args.steps} steps; load average {results['machine']['load_average'][0]:.1f}")
    else:
        print(f"\n{'setting':<16}{'KL before':>10}{'KL after':>10}{'wall s':>8}{'CPU s':>8}")
        for row in results["rows"]:
            print(f"{row['setting']:<16}{row['kl_before']:>10.4f}{row['kl_after']:>10.4f}{row['wall_s']:>8.0f}"
                  f"{row['cpu_s']:>8.0f}")
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main()
