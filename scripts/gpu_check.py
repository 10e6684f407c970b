"""Device check: what this checkout does on the CUDA GPUs of this machine, in one table (a few minutes).

    make gpu-check                      # or: .venv/bin/python scripts/gpu_check.py [--keep DIR] [--dry-run]

1. ``configs/tiny.yaml`` end to end with the parent in bf16, BLD, scoring and GKD on
   ``cuda`` (bf16 autocast), the ``measured`` cost model timing blocks on the GPU;
2. GKD of the tiny run again, sharded with FSDP2 over one NCCL process per visible GPU;
3. ``puzzle model info`` pricing the tiny parent with the ``measured`` cost model on CUDA
   in bf16 (``generate`` timed on the GPU), next to the ``h100`` roofline's prediction.

Each step runs ``puzzle`` in a subprocess with a time limit, on a cache of its own (a
temporary folder unless ``--keep``); the table gives each step's status, wall time and
what it produced. Exit code 0 when every step passed, 1 when one failed. On a machine
without CUDA it prints that nothing was checked and exits 0: the CPU tests cover the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = [sys.executable, "-m", "puzzle_core.cli"]
TINY = str(ROOT / "configs" / "tiny.yaml")
STEP_LIMIT_S = 240


def steps(work: Path, gpus: int) -> list[tuple[str, list[str]]]:
    """``(name, puzzle arguments)`` of every check."""
    run_dir = str(work / "tiny-bf16")
    on_gpu = ["--set", "parent.dtype=bf16", "--set", "library.device=cuda", "--set", "gkd.device=cuda",
              "--set", "gkd.bf16=true", "--set", "costs.model=measured", "--set", "scenario.device=cuda",
              "--set", "scenario.dtype=bf16", "--set", "scenario.kv_dtype=bf16"]
    return [
        ("tiny pipeline, bf16 on cuda", ["run", TINY, "--run-dir", run_dir, *on_gpu]),
        (f"FSDP GKD under torchrun, nccl x {gpus}", [
            "run", TINY, "--run-dir", str(work / "tiny-torchrun"), "--reuse", run_dir, "--stage", "gkd", *on_gpu,
            "--set", f"gkd.executor={{name: torchrun, nproc: {gpus}, backend: nccl, threads: 1}}",
            "--set", "gkd.sharding=fsdp"]),
        ("measured cost model on cuda (bf16)", [
            "model", "info", "tiny-random-llama", "--cost-model", "measured", "--set", "scenario.device=cuda",
            "--set", "scenario.dtype=bf16", "--set", "scenario.kv_dtype=bf16", "--json"]),
        ("h100 roofline, same scenario", [
            "model", "info", "tiny-random-llama", "--cost-model", "h100", "--set", "scenario.dtype=bf16",
            "--set", "scenario.kv_dtype=bf16", "--json"]),
    ]


def detail(name: str, stdout: str, work: Path) -> str:
    """What a passed step produced, in a few words."""
    if name.startswith(("measured", "h100")):
        total = json.loads(stdout)["costs"]["total"]
        return f"{total['runtime_ms']:.1f} ms per batch, {total['tokens_per_s']:,.0f} tokens/s"
    run_dir = work / ("tiny-bf16" if name.startswith("tiny") else "tiny-torchrun")
    report = run_dir / "report" / "report.md"
    return f"report {report}" if report.is_file() else f"run directory {run_dir}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="keep run directories and the cache here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.dry_run:
        for name, command in steps(args.keep or Path("WORK"), max(gpus, 1)):
            print(f"{name}: puzzle {' '.join(command)}")
        return 0
    if not gpus:
        print(f"No CUDA device visible to torch {torch.__version__}: nothing to check on this machine "
              f"(the CPU test suite covers the rest). Run this where `nvidia-smi` lists a GPU.")
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="puzzle-gpu-check-"))
    plan = steps(work, gpus)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} x {torch.cuda.get_device_name(0)}, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, NCCL {'yes' if dist.is_nccl_available() else 'no'}")
    env = {**os.environ, "PUZZLE_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for name, command in plan:
        started = time.perf_counter()
        try:
            done = subprocess.run([*PUZZLE, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=STEP_LIMIT_S)
            seconds = time.perf_counter() - started
            if done.returncode == 0:
                rows.append((name, "pass", seconds, detail(name, done.stdout, work)))
            else:
                last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
                rows.append((name, f"FAIL ({done.returncode})", seconds, last[0][:160]))
        except subprocess.TimeoutExpired:
            rows.append((name, "FAIL (time)", time.perf_counter() - started, f"over {STEP_LIMIT_S} s"))
        print(f"  {rows[-1][0]}: {rows[-1][1]} ({rows[-1][2]:.0f} s)", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':{width}s}  {'status':10s} {'wall':>6s}  result")
    for name, status, seconds, text in rows:
        print(f"{name:{width}s}  {status:10s} {seconds:5.0f}s  {text}")
    print(f"\nwork folder: {work}")
    return 0 if all(r[1] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
