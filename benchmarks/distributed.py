"""Benchmark: GKD and replace-1-block scoring in one process vs two torch.distributed processes (CPU, gloo).

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

``--part scoring``: replace-1-block scoring of every layer's blocks (the parent's, a GQA
variant, a half-width FFN, no-op attention) over ``--score-tokens`` tokens, by the
single-process engine and by the two-process pipeline engine (the parent's layers split
between them, :mod:`puzzle_core.scoring_pipeline`), each process with ``--threads``
threads; scored tokens per wall second (blocks x tokens), parent pass included.

    .venv/bin/python benchmarks/distributed.py [--part gkd|scoring] [--hidden 256] [--layers 4] [--seq-len 64]
        [--batch-size 4] [--tokens 8192] [--score-tokens 2048] [--threads 1] [--repeats 3]

Writes ``benchmarks/results/distributed.json`` (``distributed_scoring.json`` for scoring).
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
    parser.add_argument("--part", choices=["gkd", "scoring"], default="gkd")
    parser.add_argument("--score-tokens", type=int, default=2048, help="tokens each block is scored on")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per process and micro-batch (pair)")
    parser.add_argument("--tokens", type=int, default=8192, help="GKD training tokens per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or (RESULTS if args.part == "gkd" else RESULTS.with_name("distributed_scoring.json"))
    return args


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


def score_all(args, engine_for) -> dict:
    """Build an engine (``engine_for(runner, batches, parent, registries)``) and score every layer's blocks."""
    import time

    from puzzle_core.blocks import AttentionSpec, FFNSpec
    from puzzle_core.interfaces import ScoringBatch
    from puzzle_core.registry import get_registries
    from puzzle_core.scoring import next_token_labels

    registries = get_registries()
    family, parent, _, corpus = setup(args)
    runner = family.layer_runner(parent.model)
    ids = corpus.splits["validation"].tokens[: args.score_tokens].reshape(-1, args.seq_len)
    batches = [ScoringBatch(x, torch.ones_like(x, dtype=torch.bool), next_token_labels(x)) for x in ids.split(8)]
    scorers = {"kl": registries.scorers.get("kl").create()}
    started = time.perf_counter()
    engine, owns = engine_for(runner, batches, parent, scorers)
    variants = [(None, None), (AttentionSpec(n_heads_in_group=4), None), (None, FFNSpec(intermediate_size=2 * args.hidden)),
                (AttentionSpec(no_op=True), None)]
    blocks = 0
    with torch.no_grad():
        for layer in range(runner.num_layers):
            for attention, ffn in variants:
                modules = (None, None)
                if owns(layer):
                    modules = tuple(family.init_sublayer(parent, layer, spec, None).eval() if spec is not None
                                    else runner.sublayer(layer, part) for spec, part in ((attention, "attention"),
                                                                                          (ffn, "ffn")))
                engine.score(layer, *modules, scorers)
                blocks += 1
    seconds = time.perf_counter() - started
    return {"tokens": blocks * int(ids.numel()), "seconds": seconds}


def _score_worker(rank: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    from puzzle_core.scoring_pipeline import PipelineScoringEngine, layer_ranges

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        own = layer_ranges(args.layers, 2)[rank]

        def engine_for(runner, batches, parent, scorers):
            engine = PipelineScoringEngine(runner, batches, hidden_size=args.hidden, dtype=torch.float32,
                                           keep_log_probs=True, references=scorers)
            return engine, lambda layer: layer in own

        result = score_all(args, engine_for)
        if rank == 0:
            Path(out, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def score_pair(args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_score_worker, args=(port, args, out), nprocs=2, join=True)
        return json.loads(Path(out, "result.json").read_text())


def score_single(args, threads: int) -> dict:
    from puzzle_core.scoring import ReplaceOneBlockEngine

    torch.set_num_threads(threads)

    def engine_for(runner, batches, parent, scorers):
        engine = ReplaceOneBlockEngine(runner, batches, keep_log_probs=True, vocab_size=512, max_cache_mib=4096,
                                       references=scorers, progress=False)
        return engine, lambda layer: True

    return score_all(args, engine_for)


def main() -> None:
    args = parse_args()
    settings = {
        f"1 process x {args.threads} thread(s)": lambda: single(args, args.threads),
        f"1 process x {2 * args.threads} threads": lambda: single(args, 2 * args.threads),
        f"2 processes DDP x {args.threads}": lambda: pair(args, "ddp"),
        f"2 processes FSDP2 x {args.threads}": lambda: pair(args, "fsdp"),
    }
    if args.part == "scoring":
        settings = {
            f"1 process x {args.threads} thread(s)": lambda: score_single(args, args.threads),
            f"1 process x {2 * args.threads} threads": lambda: score_single(args, 2 * args.threads),
            f"2 processes, layers split x {args.threads}": lambda: score_pair(args),
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
                     "final_loss": results[0].get("final_loss"), "runs": results})
    base = rows[0]["tokens_per_s"]
    what = (f"GKD, {args.seq_len} tokens x {2 * args.batch_size} sequences per step, {args.tokens} tokens"
            if args.part == "gkd" else f"scoring, {4 * args.layers} blocks x {args.score_tokens} tokens")
    print(f"\n{what}, {args.layers} layers x {args.hidden} wide, CPU (gloo); median (range) of {args.repeats}")
    print(f"{'setting':36s} {'tokens/s':>9s} {'range':>13s} {'vs 1 process':>13s} {'final loss':>11s}")
    for row in rows:
        loss = f"{row['final_loss']:11.5f}" if row["final_loss"] is not None else f"{'-':>11s}"
        print(f"{row['setting']:36s} {row['tokens_per_s']:9.0f} {row['min']:6.0f}-{row['max']:<6.0f} "
              f"{row['tokens_per_s'] / base:12.2f}x {loss}")
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
