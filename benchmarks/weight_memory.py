"""Benchmark: how fast the parent runs from where ``from_pretrained`` leaves its weights.

``from_pretrained`` leaves a safetensors checkpoint's weights in the memory-mapped file,
at the file's offsets (not aligned to a cache line), while the pipeline builds and loads
children into memory torch allocates. This times the parent of ``--config`` three ways
in the config's scenario, the three interleaved round by round with the throughput
evaluator's ``generate`` (``TimedGenerate``):

- ``as loaded``: the weights in the memory-mapped checkpoint;
- ``own memory, file offsets``: copied into torch-allocated memory at the same offsets
  modulo 64 bytes as in the file (the mapping removed, the misalignment kept);
- ``own memory, aligned``: copied into torch-allocated memory (what ``owns_weights``
  asks for, and what the ``throughput`` evaluator times since the fix).

Each ratio is the median over rounds of per-round time ratios, with quartiles and range.

    .venv/bin/python benchmarks/weight_memory.py [--config configs/demo.yaml] [--rounds 15] [--out PATH]

Writes ``benchmarks/results/weight_memory.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from pathlib import Path

import attrs
import torch

from puzzle_core.devices import torch_threads
from puzzle_core.parents import load_parent
from puzzle_core.registry import get_registries
from puzzle_core.rundir import atomic_write_json
from puzzle_core.schema import load_config
from puzzle_core.timing import ALIGNMENT, Spread, TimedGenerate, interleaved, owns_weights, scenario_prompt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "weight_memory.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="its parent and scenario are used")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs all three models)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def at_offsets(model):
    """A copy of ``model`` in torch-allocated memory, each parameter at its old address's offset modulo 64 bytes."""
    twin = copy.deepcopy(model)
    for original, parameter in zip(model.parameters(), twin.parameters()):
        shift = original.data_ptr() % ALIGNMENT
        buffer = torch.empty(parameter.numel() * parameter.element_size() + shift, dtype=torch.uint8)
        parameter.data = buffer[shift:].view(parameter.dtype).view(parameter.shape).copy_(original.data)
    return twin


def main() -> None:
    args = parse_args()
    config = load_config(args.config)
    _, parent = load_parent(config.parent, get_registries())
    scenario = config.scenario
    models = {
        "as loaded": parent.model,
        "own memory, file offsets": at_offsets(parent.model),
        "own memory, aligned": copy.deepcopy(parent.model),
    }
    offsets = {name: sorted({p.data_ptr() % ALIGNMENT for p in m.parameters()}) for name, m in models.items()}
    owned = {name: owns_weights(m) for name, m in models.items()}
    prompt = scenario_prompt(parent.shape.vocab_size, scenario, "cpu", config.seed)
    runs = [TimedGenerate(m, prompt, scenario.decode_len, "cpu", "wall", parent.tokenizer) for m in models.values()]
    load_before = os.getloadavg()
    with torch_threads(scenario.threads), torch.inference_mode():
        timings = interleaved(runs, args.rounds, args.warmup)
    ms = {name: [t.total_ms for t in series] for name, series in zip(models, timings)}
    aligned = ms["own memory, aligned"]
    rows = []
    for name in models:
        ratio = Spread.of([a / b for a, b in zip(ms[name], aligned)])
        rows.append({"model": name, "offsets_mod_64": offsets[name], "owns_weights": owned[name],
                     "median_ms": Spread.of(ms[name]).median, "ms": ms[name],
                     "vs_aligned": attrs.asdict(ratio)})
    print(f"\n{config.parent.source}, {scenario.batch_size} x ({scenario.prefill_len} + {scenario.decode_len}) tokens, "
          f"{scenario.dtype}, {scenario.threads} threads, {args.rounds} paired rounds (wall clock)")
    print(f"{'weights':26s} {'offsets mod 64':>15s} {'median ms':>10s}  time / aligned copy [IQR] (range)")
    for row in rows:
        r = row["vs_aligned"]
        print(f"{row['model']:26s} {str(row['offsets_mod_64']):>15s} {row['median_ms']:10.0f}  "
              f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}] ({r['low']:.3f}-{r['high']:.3f})")
    results = {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "config": str(args.config.resolve().relative_to(ROOT)) if args.config.resolve().is_relative_to(ROOT)
        else args.config.name,
        "parent": config.parent.source, "scenario": attrs.asdict(scenario), "rounds": args.rounds,
        "warmup": args.warmup, "rows": rows,
    }
    atomic_write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
