"""Benchmark: GKD in one process vs two torch.distributed processes (DDP, FSDP2) on the CPU, gloo.

The same child and teacher (a small random Llama, ``--hidden`` wide, ``--layers`` deep,
and a DeciLM child with one block of each kind), the same random-token corpus and the same
tokens per optimizer step: one process with ``2 x --batch-size`` sequences per step, or
two processes with ``--batch-size`` each. Every process uses ``--threads`` torch threads,
and the single process is also run with ``2 x --threads`` (the same cores as the pair).
Reported: GKD training tokens per wall second (``distill``'s own clock, which starts
after set-up and the first validation), median and range over ``--repeats`` rounds, the
settings interleaved within each round. The overhead of two processes is the
communication (all-reduce for DDP; all-gathers and reduce-scatters for FSDP) plus the
smaller matrix products of half a batch.

    .venv/bin/python benchmarks/distributed.py [--hidden 256] [--layers 4] [--seq-len 64] [--batch-size 4]
        [--tokens 8192] [--threads 1] [--repeats 3]

Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "distributed.json"
CHILD = ("attn_g2+ffn_{mid}", "attn_g4+ffn_{full}", "attn_linear+ffn_{full}", "attn_g2+ffn_noop")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per process and micro-batch (pair)")
    parser.add_argument("--tokens", type=int, default=8192, help="GKD training tokens per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def setup(args):
    """``(family, parent, child, corpus)``, the same in every process (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle_core.blocks import BlockSpec
    from puzzle_core.data import CorpusSplit, TokenizedCorpus
    from puzzle_core.interfaces import LoadedModel
    from puzzle_core.registry import get_registries

    family = get_registries().architectures.get("llama").create()
    config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4 * args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    parent = LoadedModel(LlamaForCausalLM(config).eval(), None, family.shape(config.to_dict()), source="random")
    blocks = [CHILD[i % len(CHILD)].format(full=4 * args.hidden, mid=2 * args.hidden) for i in range(args.layers)]
    child = family.build_child(parent, [BlockSpec.parse(b) for b in blocks])
    generator = torch.Generator().manual_seed(0)
    splits = {s: CorpusSplit((), torch.randint(4, 512, (n,), generator=generator))
              for s, n in (("train", 4 * args.tokens), ("validation", 2048), ("test", 512))}
    return family, parent, child, TokenizedCorpus("random", splits)


def distill_once(args, batch_size: int, sharding: str, out: Path) -> dict:
    from puzzle_core import gkd
    from puzzle_core.config import structure
    from puzzle_core.registry import get_registries
    from puzzle_core.schema import GKDSection

    family, parent, child, corpus = setup(args)
    section = structure({"tokens": args.tokens, "batch_size": batch_size, "seq_len": args.seq_len, "lr": 1e-3,
                         "checkpoint_every": 10**6, "validation_tokens": 256, "device": "cpu",
                         "sharding": sharding}, GKDSection)
    objective = gkd.DistillationObjective.from_config(section, get_registries())
    run = gkd.DistillRun(corpus=corpus, seq_len=args.seq_len, seed=0, checkpoint_dir=out, fingerprint=sharding)
    _, log, totals = gkd.distill(child, parent, family, objective, section, run)
    return {"tokens": totals["tokens"], "seconds": totals["train_seconds"], "final_loss": log.train[-1].loss}


def _worker(rank: int, port: int, args, sharding: str, out: str) -> None:
    from puzzle_core import gkd

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank)})
    torch.set_num_threads(args.threads)
    gkd.join_process_group()
    try:
        result = distill_once(args, args.batch_size, sharding, Path(out) / f"ckpt{rank}")
        if rank == 0:
            Path(out, "result.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def pair(args, sharding: str) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(port, args, sharding, out), nprocs=2, join=True)
        return json.loads(Path(out, "result.json").read_text())


def single(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        return distill_once(args, 2 * args.batch_size, "ddp", Path(out))


def main() -> None:
    args = parse_args()
    settings = {
        f"1 process x {args.threads} thread(s)": lambda: single(args, args.threads),
        f"1 process x {2 * args.threads} threads": lambda: single(args, 2 * args.threads),
        f"2 processes DDP x {args.threads}": lambda: pair(args, "ddp"),
        f"2 processes FSDP2 x {args.threads}": lambda: pair(args, "fsdp"),
    }
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for round_ in range(args.repeats):
        for name, run in settings.items():
            runs[name].append(run())
            print(f"round {round_ + 1}: {name}: {runs[name][-1]['tokens'] / runs[name][-1]['seconds']:.0f} tokens/s",
                  flush=True)
    rows = []
    for name, results in runs.items():
        rates = [r["tokens"] / r["seconds"] for r in results]
        rows.append({"setting": name, "tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                     "final_loss": results[0]["final_loss"], "runs": results})
    base = rows[0]["tokens_per_s"]
    print(f"\nGKD on the CPU (gloo), {args.layers} layers x {args.hidden} wide, {args.seq_len} tokens x "
          f"{2 * args.batch_size} sequences per step, {args.tokens} tokens; median (range) of {args.repeats}")
    print(f"{'setting':32s} {'tokens/s':>9s} {'range':>13s} {'vs 1 process':>13s} {'final loss':>11s}")
    for row in rows:
        print(f"{row['setting']:32s} {row['tokens_per_s']:9.0f} {row['min']:6.0f}-{row['max']:<6.0f} "
              f"{row['tokens_per_s'] / base:12.2f}x {row['final_loss']:11.5f}")
    from puzzle_core.rundir import atomic_write_json

    atomic_write_json(args.out, {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    })
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
