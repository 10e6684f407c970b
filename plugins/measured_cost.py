"""The ``measured`` cost model: time each distinct block on the local device.

A block's cost is what it adds to a real generation workload, measured with the model
family's own code: the family builds a random model with ``layers`` copies of the block
(``random_model(shape.with_blocks([block] * layers))``) and one with no layers at all;
both run the scenario's workload interleaved (so load on a shared machine hits both
alike), and the block's cost is the paired difference divided by ``layers``. The
zero-layer model's own times are the fixed costs (embedding, final norm, LM head,
per-forward bookkeeping).

The workload is what ``generate`` does: a prefill over ``prefill_len`` tokens (logits of
the last position only) and single-token decode steps against a KV cache. Only
``decode_points`` steps, spread from the first to the last, are timed (after the cache is
filled to the right length); the others are interpolated, which is exact while a step's
time is linear in the cache length. Each timing is the median (``statistic: min``: the
fastest) of ``repeats`` after ``warmup`` runs, with ``scenario.threads`` CPU threads.

``clock: wall`` (default) times wall-clock time, the truth on a dedicated machine.
``clock: process`` times this process's CPU time instead: with ``threads: 1`` it equals
wall time on an idle machine but leaves out the time the OS gives other processes, so
blocks can be measured reliably on a busy, shared machine (CPU only).

Results are cached on disk under ``$PUZZLE_CACHE/costs`` (else ``~/.cache/puzzle/costs``)
by block, model shape, scenario, device, torch and transformers versions and these
options, so a second run costs nothing; ``cache: false`` measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import attrs

from puzzle_core.api import (
    BlockSpec,
    CostModel,
    CostModelPlugin,
    ModelFamily,
    ModelShape,
    UserError,
    atomic_write_json,
    ffn_size,
    hookimpl,
    kv_heads,
    parameter_count,
)

MIB = 2**20
METHOD_VERSION = 1  # bump when the measurement changes meaning, to retire old cache entries
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _positive(_instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class MeasuredOptions:
    """How blocks are timed."""

    layers: int = attrs.field(default=4, validator=_positive)  # copies of a block per timed model
    warmup: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    repeats: int = attrs.field(default=5, validator=_positive)
    decode_points: int = attrs.field(default=3, validator=_positive)  # decode steps timed per model
    clock: Literal["wall", "process"] = "wall"  # 'process': CPU time of this process (see the module docstring)
    statistic: Literal["median", "min"] = "median"  # of the repeats; 'min' is steadier on a busy machine
    cache: bool = True
    cache_dir: str | None = None  # None: $PUZZLE_CACHE/costs, else ~/.cache/puzzle/costs


# ---------------------------------------------------------------- devices and threads


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a missing CUDA is a UserError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"scenario.device is '{name}' but this machine has no CUDA device. Use 'cpu' or 'auto'.")
    return name


def device_description(device: str, threads: int) -> str:
    """What the timings were taken on (part of the cache key)."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {threads} thread(s)"


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with a fixed number of intra-op CPU threads, restoring the previous number."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- the workload


@attrs.frozen
class WorkloadTiming:
    """One model's times for a scenario, and what it holds in memory."""

    prefill_ms: float
    decode_ms: float  # all decode steps together
    num_params: int
    weight_bytes: int
    kv_bytes_per_position: float  # KV cache bytes per cached position (all sequences)


class _Generation:
    """One model stepping through the scenario like ``generate`` (greedy, KV cache, last logits)."""

    def __init__(self, model, tokens, prompt_len: int):
        self.model = model
        self.tokens = tokens  # (batch, prompt + generated) ids: the prompt, then what is fed while decoding
        self.prompt_len = prompt_len
        parameters = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache = None
        self.length = 0  # positions fed so far (the cache may hold none: no attention layers)
        self.next_tokens = None

    def forward(self, tokens):
        import torch

        batch, new = tokens.shape
        mask = torch.ones(batch, self.length + new, dtype=torch.long, device=tokens.device)
        output = self.model(tokens, attention_mask=mask, cache=self.cache, use_cache=True, **self.extra)
        self.cache = output.cache
        self.length += new
        self.next_tokens = output.logits[:, -1:].argmax(-1)

    def prefill(self):
        self.cache, self.length = None, 0
        self.forward(self.tokens[:, : self.prompt_len])

    def extend_to(self, length: int):
        """Feed tokens (in one chunk) until ``length`` positions are cached."""
        if length > self.length:
            self.forward(self.tokens[:, self.length : length])

    def crop_to(self, length: int):
        if self.length > length:
            if self.cache is not None and self.cache.get_seq_length() > 0:
                self.cache.crop(length - self.length)
            self.length = length

    def decode_step(self):
        self.forward(self.next_tokens)

    def cache_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", ()):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None and hasattr(tensor, "nbytes"):
                    total += tensor.nbytes
        return total


def _synchronize(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed_ms(action, device: str = "cpu", clock: str = "wall") -> float:
    """Milliseconds ``action`` takes on ``clock``, with the device's queue drained before and after."""
    now = CLOCKS[clock]
    _synchronize(device)
    started = now()
    action()
    _synchronize(device)
    return (now() - started) * 1e3


def decode_steps_timed(decode_len: int, points: int) -> list[int]:
    """Which decode steps (1 .. decode_len - 1) are timed: evenly spread, ends included."""
    steps = decode_len - 1
    if steps <= 0:
        return []
    count = min(points, steps)
    if count == 1:
        return [(steps + 1) // 2]
    return sorted({round(1 + i * (steps - 1) / (count - 1)) for i in range(count)})


STATISTICS = {"median": statistics.median, "min": min}


def time_workloads(models: Sequence[Any], scenario, device: str, warmup: int, repeats: int, decode_points: int,
                   clock: str = "wall", statistic: str = "median", seed: int = 0) -> list[WorkloadTiming]:
    """Time the scenario's workload on each model, interleaving the models in every repeat."""
    import torch

    summary = STATISTICS[statistic]
    generator = torch.Generator().manual_seed(seed)
    vocab = min(int(m.get_input_embeddings().num_embeddings) for m in models)
    shape = (scenario.batch_size, scenario.prefill_len + scenario.decode_len)
    tokens = torch.randint(0, vocab, shape, generator=generator).to(device)
    runs = [_Generation(model, tokens, scenario.prefill_len) for model in models]
    prefill: list[list[float]] = [[] for _ in runs]
    decode: list[list[float]] = [[] for _ in runs]
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for index, run in enumerate(runs):
                elapsed = timed_ms(run.prefill, device, clock)
                if round_ >= warmup:
                    prefill[index].append(elapsed)
        kv_per_position = [run.cache_bytes() / (scenario.batch_size * scenario.prefill_len) for run in runs]
        points = decode_steps_timed(scenario.decode_len, decode_points)
        for step in points:
            before = scenario.prefill_len + step - 1  # cached positions when step `step` runs
            for run in runs:
                run.extend_to(before)
            times: list[list[float]] = [[] for _ in runs]
            for round_ in range(warmup + repeats):
                for index, run in enumerate(runs):
                    run.crop_to(before)
                    elapsed = timed_ms(run.decode_step, device, clock)
                    if round_ >= warmup:
                        times[index].append(elapsed)
            for index in range(len(runs)):
                decode[index].append(summary(times[index]))
    steps = scenario.decode_len - 1
    return [
        WorkloadTiming(
            prefill_ms=summary(prefill[i]),
            decode_ms=statistics.fmean(decode[i]) * steps if points else 0.0,
            num_params=parameter_count(models[i]),
            weight_bytes=sum(p.numel() * p.element_size() for p in models[i].parameters()),
            kv_bytes_per_position=kv_per_position[i],
        )
        for i in range(len(runs))
    ]


# ---------------------------------------------------------------- the cost model


def default_cache_dir() -> Path:
    root = os.environ.get("PUZZLE_CACHE") or Path.home() / ".cache" / "puzzle"
    return Path(root).expanduser() / "costs"


def _stats(prefill_ms: float, decode_ms: float, num_params: float, memory_bytes: float, kv_bytes: float,
           num_kv_heads: int, intermediate_size: int) -> dict:
    return {
        "runtime_ms": prefill_ms + decode_ms,
        "prefill_ms": prefill_ms,
        "decode_ms": decode_ms,
        "memory_mib": memory_bytes / MIB,
        "kv_cache_mib": kv_bytes / MIB,
        "num_params": int(round(num_params)),
        "num_kv_heads": num_kv_heads,
        "ffn_intermediate_size": intermediate_size,
    }


class MeasuredCostModel(CostModel):
    """Times blocks on the local device; see the module docstring."""

    def __init__(self, options: MeasuredOptions | None = None):
        self.options = options or MeasuredOptions()
        self.cache_dir = Path(self.options.cache_dir).expanduser() if self.options.cache_dir else default_cache_dir()
        self.measured = 0  # blocks actually timed by this instance (the rest came from the cache)

    # ---- cache

    def cache_key(self, what: str, shape: ModelShape, scenario, device: str) -> dict:
        import torch
        import transformers

        return {
            "method": METHOD_VERSION,
            "what": what,
            "shape": {k: v for k, v in attrs.asdict(shape, recurse=False).items() if k not in ("blocks", "num_layers")},
            "scenario": attrs.asdict(scenario),
            "device": device_description(device, scenario.threads),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "options": {k: v for k, v in attrs.asdict(self.options).items() if k not in ("cache", "cache_dir")},
        }

    def _cache_path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.cache_dir / f"{digest}.json"

    def _cached(self, key: dict, measure) -> dict:
        path = self._cache_path(key)
        if self.options.cache and path.is_file():
            with contextlib.suppress(json.JSONDecodeError, KeyError, OSError):
                entry = json.loads(path.read_text())
                if entry["key"] == json.loads(json.dumps(key, default=str)):
                    return entry["costs"]
        costs = measure()
        self.measured += 1
        if self.options.cache:
            atomic_write_json(path, {"key": key, "costs": costs})
        return costs

    # ---- measuring

    def _models(self, family: ModelFamily, shape: ModelShape, blocks: Sequence[BlockSpec], scenario, device: str):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = family.random_model(
                attrs.evolve(shape, num_layers=len(blocks), blocks=tuple(blocks)), TORCH_DTYPES[scenario.dtype]
            )
        return model.to(device)

    def _setup(self, scenario, family: ModelFamily | None) -> str:
        if family is None:
            raise UserError("The 'measured' cost model builds blocks with the parent's model family; none was given.")
        if scenario.dtype not in TORCH_DTYPES:
            raise UserError(
                f"The 'measured' cost model runs real kernels and has none for dtype '{scenario.dtype}' here. "
                f"Set scenario.dtype to one of {', '.join(TORCH_DTYPES)}, or use an analytic model (h100, rtx4090)."
            )
        if scenario.kv_dtype != scenario.dtype:
            raise UserError(
                f"The 'measured' cost model keeps the KV cache in the model's dtype, so scenario.kv_dtype "
                f"('{scenario.kv_dtype}') must equal scenario.dtype ('{scenario.dtype}'). Set kv_dtype: {scenario.dtype}."
            )
        device = resolve_device(scenario.device)
        if self.options.clock == "process" and device != "cpu":
            raise UserError("The 'process' clock counts CPU time and cannot time GPU kernels; use clock: wall on CUDA.")
        return device

    def _time(self, models, scenario, device) -> list[WorkloadTiming]:
        o = self.options
        with torch_threads(scenario.threads):
            return time_workloads(models, scenario, device, o.warmup, o.repeats, o.decode_points, o.clock, o.statistic)

    def block_costs(self, shape: ModelShape, block: BlockSpec, scenario, family: ModelFamily | None) -> dict:
        device = self._setup(scenario, family)
        kv = kv_heads(shape, block.attention)

        def measure() -> dict:
            k = self.options.layers
            base, stacked = (self._models(family, shape, blocks, scenario, device) for blocks in ([], [block] * k))
            empty, full = self._time([base, stacked], scenario, device)
            positions = scenario.batch_size * (scenario.prefill_len + scenario.decode_len)
            kv_bytes = (full.kv_bytes_per_position - empty.kv_bytes_per_position) * positions / k
            return _stats(
                max(0.0, (full.prefill_ms - empty.prefill_ms) / k),
                max(0.0, (full.decode_ms - empty.decode_ms) / k),
                (full.num_params - empty.num_params) / k,
                (full.weight_bytes - empty.weight_bytes) / k + kv_bytes,
                kv_bytes,
                kv,
                ffn_size(block.ffn),
            )

        if block.attention.kind == "no_op" and block.ffn.kind == "no_op":
            return _stats(0.0, 0.0, 0, 0, 0, 0, 0)  # nothing runs but a function call
        return self._cached(self.cache_key(block.id, shape, scenario, device), measure)

    def fixed_costs(self, shape: ModelShape, scenario, family: ModelFamily | None) -> dict:
        device = self._setup(scenario, family)

        def measure() -> dict:
            (empty,) = self._time([self._models(family, shape, [], scenario, device)], scenario, device)
            return _stats(empty.prefill_ms, empty.decode_ms, empty.num_params, empty.weight_bytes, 0, 0, 0)

        return self._cached(self.cache_key("fixed", shape, scenario, device), measure)

    def memory_capacity_mib(self, scenario) -> float:
        import psutil
        import torch

        device = resolve_device(scenario.device)
        if device.startswith("cuda"):
            return torch.cuda.get_device_properties(torch.device(device)).total_memory / MIB
        return psutil.virtual_memory().total / MIB


@hookimpl
def puzzle_cost_models() -> list[CostModelPlugin]:
    return [
        CostModelPlugin(
            name="measured",
            implementation=MeasuredCostModel,
            options=MeasuredOptions,
            description="Times each block on the local device (CPU, or CUDA when scenario.device says so); cached",
        )
    ]
