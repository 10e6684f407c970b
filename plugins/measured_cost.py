"""The ``measured`` cost model: time each distinct block on the local device.

A block's cost is what it adds to a real generation workload, measured with the model
family's own code: the family builds a random model with ``layers`` copies of the block
(``random_model(shape.with_blocks([block] * layers))``) and one with no layers at all.
Both run the scenario exactly as the ``throughput`` evaluator runs a child: Hugging Face
``generate`` (greedy, KV cache, exactly ``decode_len`` new tokens for a batch of
``batch_size`` prompts of ``prefill_len`` tokens), with ``scenario.threads`` CPU
threads. The two models take turns (``warmup`` untimed rounds, then ``repeats`` timed
ones, the order reversing every round) so that load or clock drift on a shared machine
hits both alike; a block's cost is the median over rounds of the paired difference,
divided by ``layers``. The zero-layer model's own median time is the fixed cost
(embedding, final norm, LM head, and ``generate``'s per-step bookkeeping, which the
end-to-end measurement pays too). Prefill is the first forward call inside the same
``generate`` (timed by hooks); decode is the rest. ``statistic: min`` differences the
fastest run of each model instead.

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
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import attrs

from puzzle_core import hookimpl
from puzzle_core.blocks import BlockSpec
from puzzle_core.errors import UserError
from puzzle_core.interfaces import CostModel, ModelFamily, ModelShape, parameter_count
from puzzle_core.records import CostModel as CostModelRecord
from puzzle_core.rundir import atomic_write_json
from puzzle_plugins.local_executor import torch_threads
from puzzle_plugins.roofline import ffn_size, kv_heads

MIB = 2**20
METHOD_VERSION = 2  # bump when the measurement changes meaning, to retire old cache entries
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _positive(_instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class MeasuredOptions:
    """How blocks are timed."""

    layers: int = attrs.field(default=8, validator=_positive)  # copies of a block per timed model
    warmup: int = attrs.field(default=1, validator=attrs.validators.ge(0))  # untimed rounds first
    repeats: int = attrs.field(default=5, validator=_positive)  # timed rounds (each runs both models once)
    clock: Literal["wall", "process"] = "wall"  # 'process': CPU time of this process (see the module docstring)
    # 'median': of the per-round paired differences; 'min': the fastest run of each model, differenced
    statistic: Literal["median", "min"] = "median"
    cache: bool = True
    cache_dir: str | None = None  # None: $PUZZLE_CACHE/costs, else ~/.cache/puzzle/costs


# ---------------------------------------------------------------- devices


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


# ---------------------------------------------------------------- timing generate()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
STATISTICS = {"median": statistics.median, "min": min}


def _synchronize(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def timed_ms(action, device: str = "cpu", clock: str = "wall") -> float:
    """Milliseconds ``action`` takes on ``clock``, with the device's queue drained before and after."""
    now = CLOCKS[clock]
    _synchronize(device)
    started = now()
    action()
    _synchronize(device)
    return (now() - started) * 1e3


def interleaved(actions: Sequence[Callable[[], Any]], rounds: int, warmup: int = 0) -> list[list[Any]]:
    """``results[i][r]``: what action ``i`` returned in timed round ``r``, after ``warmup`` untimed rounds.

    Every round runs every action once, in an order that reverses every other round
    (A B, B A, A B, ...), so a drift in the machine's speed (another job starting, the
    clock boosting) hits every action alike and cancels in per-round ratios or differences.
    """
    results: list[list[Any]] = [[] for _ in actions]
    for round_ in range(warmup + rounds):
        order = range(len(actions)) if round_ % 2 == 0 else reversed(range(len(actions)))
        for index in order:
            value = actions[index]()
            if round_ >= warmup:
                results[index].append(value)
    return results


@attrs.frozen
class Spread:
    """Median, quartiles and range of repeated measurements."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = sorted(values)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))


def generation_config(decode_len: int, tokenizer=None):
    """Greedy decoding of exactly ``decode_len`` tokens (no end-of-text stop) with a KV cache."""
    from transformers import GenerationConfig

    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=decode_len,
        min_new_tokens=decode_len,
        use_cache=True,
        pad_token_id=pad if pad is not None else eos if eos is not None else 0,
        eos_token_id=eos,
        return_dict_in_generate=True,
    )


@attrs.frozen
class GenerateTiming:
    """One timed ``generate`` call: all of it, and its first forward (the prefill) alone."""

    total_ms: float
    prefill_ms: float

    @property
    def decode_ms(self) -> float:
        return self.total_ms - self.prefill_ms


class TimedGenerate:
    """The scenario as ``generate`` runs it on one model: prefill of the prompt, then greedy decoding.

    Calling it runs ``generate`` once and returns a :class:`GenerateTiming`; the prefill is
    timed by hooks on the model's first forward call inside the same ``generate``, so
    prefill and decode add up to the end-to-end time, ``generate``'s own overhead included.
    """

    def __init__(self, model, prompt, decode_len: int, device: str = "cpu", clock: str = "wall", tokenizer=None):
        self.model = model
        self.prompt = prompt
        self.mask = prompt.new_ones(prompt.shape)
        self.settings = generation_config(decode_len, tokenizer)
        self.device = device
        self.now = CLOCKS[clock]
        self.kv_bytes_per_position: float | None = None  # KV cache bytes per cached position, after the first call

    def __call__(self) -> GenerateTiming:
        marks: list[float] = []

        def before(_module, _args):
            if not marks:
                _synchronize(self.device)
                marks.append(self.now())

        def after(_module, _args, _output):
            if len(marks) == 1:
                _synchronize(self.device)
                marks.append(self.now())

        hooks = [self.model.register_forward_pre_hook(before), self.model.register_forward_hook(after)]
        try:
            _synchronize(self.device)
            started = self.now()
            output = self.model.generate(input_ids=self.prompt, attention_mask=self.mask,
                                         generation_config=self.settings)
            _synchronize(self.device)
            ended = self.now()
        finally:
            for hook in hooks:
                hook.remove()
        made = output.sequences.shape[1] - self.prompt.shape[1]
        if made != self.settings.max_new_tokens:
            raise RuntimeError(f"generate() made {made} tokens instead of {self.settings.max_new_tokens}")
        if self.kv_bytes_per_position is None:
            self.kv_bytes_per_position = _cache_bytes_per_position(output.cache, self.prompt.shape[0])
        return GenerateTiming(total_ms=(ended - started) * 1e3, prefill_ms=(marks[1] - marks[0]) * 1e3)


def _cache_bytes_per_position(cache, batch: int) -> float:
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += tensor.nbytes
    length = cache.get_seq_length() if cache is not None and total else 0
    return total / (batch * length) if length else 0.0


def scenario_prompt(vocab_size: int, scenario, device: str, seed: int = 0):
    """Random prompt ids ``(batch_size, prefill_len)``, the same for every model timed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (scenario.batch_size, scenario.prefill_len), generator=generator).to(device)


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

    def _time(self, models, scenario, device: str) -> tuple[list[list[GenerateTiming]], list[float]]:
        """Each model's timed rounds of ``generate`` (the models interleaved), and its KV bytes per position."""
        import torch

        o = self.options
        vocab = min(int(m.get_input_embeddings().num_embeddings) for m in models)
        prompt = scenario_prompt(vocab, scenario, device)
        runs = [TimedGenerate(m, prompt, scenario.decode_len, device, o.clock) for m in models]
        with torch_threads(scenario.threads), torch.inference_mode():
            timings = interleaved(runs, o.repeats, o.warmup)
        return timings, [run.kv_bytes_per_position for run in runs]

    def _summary(self, timings: Sequence[GenerateTiming], part: str) -> float:
        return STATISTICS[self.options.statistic]([getattr(t, part) for t in timings])

    def _paired(self, empty: Sequence[GenerateTiming], full: Sequence[GenerateTiming], part: str) -> float:
        """What the ``layers`` copies add to ``part`` (total_ms or prefill_ms), per copy."""
        k = self.options.layers
        if self.options.statistic == "min":
            return (self._summary(full, part) - self._summary(empty, part)) / k
        return statistics.median((getattr(f, part) - getattr(e, part)) / k for e, f in zip(empty, full))

    def block_costs(self, shape: ModelShape, block: BlockSpec, scenario, family: ModelFamily | None) -> dict:
        device = self._setup(scenario, family)
        kv = kv_heads(shape, block.attention)

        def measure() -> dict:
            k = self.options.layers
            models = [self._models(family, shape, blocks, scenario, device) for blocks in ([], [block] * k)]
            (empty, full), kv_per_position = self._time(models, scenario, device)
            positions = scenario.batch_size * (scenario.prefill_len + scenario.decode_len)
            kv_bytes = (kv_per_position[1] - kv_per_position[0]) * positions / k
            runtime = max(0.0, self._paired(empty, full, "total_ms"))
            prefill = min(runtime, max(0.0, self._paired(empty, full, "prefill_ms")))
            weight_bytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in models]
            return _stats(
                prefill,
                runtime - prefill,
                (parameter_count(models[1]) - parameter_count(models[0])) / k,
                (weight_bytes[1] - weight_bytes[0]) / k + kv_bytes,
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
            model = self._models(family, shape, [], scenario, device)
            (empty,), _ = self._time([model], scenario, device)
            runtime, prefill = self._summary(empty, "total_ms"), self._summary(empty, "prefill_ms")
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            return _stats(prefill, runtime - prefill, parameter_count(model), weight_bytes, 0, 0, 0)

        return self._cached(self.cache_key("fixed", shape, scenario, device), measure)

    def memory_capacity_mib(self, scenario) -> float:
        import psutil
        import torch

        device = resolve_device(scenario.device)
        if device.startswith("cuda"):
            return torch.cuda.get_device_properties(torch.device(device)).total_memory / MIB
        return psutil.virtual_memory().total / MIB


@hookimpl
def puzzle_cost_models():
    return [
        CostModelRecord(
            name="measured",
            implementation=MeasuredCostModel,
            options=MeasuredOptions,
            description="Times each block on the local device (CPU, or CUDA when scenario.device says so); cached",
        )
    ]
