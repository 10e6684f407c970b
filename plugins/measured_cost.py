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

Each block's cost also records ``runtime_spread``: the interquartile range of its
per-round differences over their median. Other work on the machine makes rounds disagree;
beyond ``NOISY_SPREAD`` the block's cost is not trusted and a ``NoisyCostWarning`` says so
(a search exploits under-measured blocks: it picks them as bargains).

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
import statistics
import warnings
from pathlib import Path
from typing import Literal, Sequence

import attrs

from puzzle_core.api import (
    BlockSpec,
    CostModel,
    CostModelPlugin,
    GenerateTiming,
    ModelFamily,
    ModelShape,
    Scenario,
    TimedGenerate,
    UserError,
    atomic_write_json,
    cache_root,
    device_description,
    ffn_size,
    hookimpl,
    interleaved,
    kv_heads,
    parameter_count,
    resolve_device,
    scenario_prompt,
    summarise,
    torch_threads,
)

MIB = 2**20
METHOD_VERSION = 3  # bump when the measurement changes meaning, to retire old cache entries (3: runtime_spread)
NOISY_SPREAD = 0.25  # a block's runtime_spread beyond which its cost is not trusted
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PROCESS_CLOCK_ON_GPU = "The 'process' clock counts CPU time and cannot time GPU kernels; use clock: wall on CUDA."


class NoisyCostWarning(UserWarning):
    """A block's timed rounds disagree: its cost, and the search that uses it, are not to be trusted."""


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


# ---------------------------------------------------------------- the cost model


def relative_spread(values: Sequence[float]) -> float:
    """Interquartile range over the median's size (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / max(abs(statistics.median(values)), 1e-9)


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
        self.cache_dir = Path(self.options.cache_dir).expanduser() if self.options.cache_dir else cache_root() / "costs"
        self.measured = 0  # blocks actually timed by this instance (the rest came from the cache)

    # ---- cache

    def cache_key(self, what: str, shape: ModelShape, scenario: Scenario, device: str) -> dict:
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

    def check_scenario(self, scenario: Scenario) -> list[str]:
        problems = []
        if scenario.dtype not in TORCH_DTYPES:
            problems.append(
                f"The 'measured' cost model runs real kernels and has none for dtype '{scenario.dtype}' here. "
                f"Set scenario.dtype to one of {', '.join(TORCH_DTYPES)}, or use an analytic model (h100, rtx4090)."
            )
        elif scenario.kv_dtype != scenario.dtype:
            problems.append(
                f"The 'measured' cost model keeps the KV cache in the model's dtype, so scenario.kv_dtype "
                f"('{scenario.kv_dtype}') must equal scenario.dtype ('{scenario.dtype}'). Set kv_dtype: {scenario.dtype}."
            )
        if scenario.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                problems.append(
                    f"scenario.device is '{scenario.device}', but torch sees no CUDA device on this machine, so the "
                    f"'measured' cost model cannot time blocks there. Set scenario.device to cpu (or auto), run on a "
                    f"machine with a GPU, or use an analytic model of the GPU (h100, rtx4090)."
                )
        if scenario.tensor_parallel > 1:
            problems.append(
                f"The 'measured' cost model times one device, so it cannot price scenario.tensor_parallel "
                f"{scenario.tensor_parallel}. Set it to 1, or use an analytic model (h100) for tensor-parallel groups."
            )
        if self.options.clock == "process" and scenario.device.startswith("cuda"):
            problems.append(PROCESS_CLOCK_ON_GPU)
        return problems

    def _setup(self, scenario: Scenario, family: ModelFamily | None) -> str:
        if family is None:
            raise UserError("The 'measured' cost model builds blocks with the parent's model family; none was given.")
        problems = self.check_scenario(scenario)
        if problems:
            raise UserError(" ".join(problems))
        device = str(resolve_device(scenario.device, what="scenario.device"))
        if self.options.clock == "process" and device != "cpu":
            raise UserError(PROCESS_CLOCK_ON_GPU)  # scenario.device 'auto' found a GPU
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
        return summarise([getattr(t, part) for t in timings], self.options.statistic)

    def _paired(self, empty: Sequence[GenerateTiming], full: Sequence[GenerateTiming], part: str) -> float:
        """What the ``layers`` copies add to ``part`` (total_ms or prefill_ms), per copy."""
        k = self.options.layers
        if self.options.statistic == "min":
            return (self._summary(full, part) - self._summary(empty, part)) / k
        return statistics.median((getattr(f, part) - getattr(e, part)) / k for e, f in zip(empty, full))

    def block_costs(self, shape: ModelShape, block: BlockSpec, scenario: Scenario, family: ModelFamily | None) -> dict:
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
            spread = relative_spread([f.total_ms - e.total_ms for e, f in zip(empty, full)])
            return _stats(
                prefill,
                runtime - prefill,
                (parameter_count(models[1]) - parameter_count(models[0])) / k,
                (weight_bytes[1] - weight_bytes[0]) / k + kv_bytes,
                kv_bytes,
                kv,
                ffn_size(block.ffn),
            ) | {"runtime_spread": spread}

        if block.attention.kind == "no_op" and block.ffn.kind == "no_op":
            return _stats(0.0, 0.0, 0, 0, 0, 0, 0)  # nothing runs but a function call
        costs = self._cached(self.cache_key(block.id, shape, scenario, device), measure)
        if costs["runtime_spread"] > NOISY_SPREAD:
            warnings.warn(NoisyCostWarning(
                f"The measured cost of block {block.id} is not to be trusted: its {self.options.repeats} timed "
                f"rounds differ by {costs['runtime_spread']:.0%} of their median (interquartile range), as when other "
                f"work shares the machine. The search would pick under-measured blocks as bargains, and the child "
                f"would run slower than predicted. Time the costs again on an idle machine ('cache: false' under "
                f"costs.model measures afresh), or time CPU work alone there ('clock: process')."
            ), stacklevel=2)
        return costs

    def fixed_costs(self, shape: ModelShape, scenario: Scenario, family: ModelFamily | None) -> dict:
        device = self._setup(scenario, family)

        def measure() -> dict:
            model = self._models(family, shape, [], scenario, device)
            (empty,), _ = self._time([model], scenario, device)
            runtime, prefill = self._summary(empty, "total_ms"), self._summary(empty, "prefill_ms")
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            return _stats(prefill, runtime - prefill, parameter_count(model), weight_bytes, 0, 0, 0)

        return self._cached(self.cache_key("fixed", shape, scenario, device), measure)

    def memory_capacity_mib(self, scenario: Scenario) -> float:
        import psutil
        import torch

        device = str(resolve_device(scenario.device, what="scenario.device"))
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
