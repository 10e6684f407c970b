"""Timing generation workloads: interleaved rounds, paired statistics, ``generate`` with its prefill.

Shared by cost models that time blocks and evaluators that time whole models, so that
both measure exactly the same thing the same way.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import attrs


def device_description(device: str, threads: int) -> str:
    """What the timings were taken on (part of the cache key)."""
    import torch

    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {threads} thread(s)"


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
STATISTICS = {"median": statistics.median, "min": min}
Statistic = Literal["median", "min"]


def summarise(values: Sequence[float], statistic: Statistic) -> float:
    """The ``median`` of repeated timings, or their ``min`` (steadier on a busy machine)."""
    return STATISTICS[statistic](values)


def _synchronize(device: str):
    if str(device).startswith("cuda"):
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


ALIGNMENT = 64  # bytes: torch's own CPU allocations start on a cache line


def owns_weights(module) -> bool:
    """Whether every CPU parameter and buffer of ``module`` lives in memory torch allocated, cache-line aligned.

    ``from_pretrained`` leaves safetensors weights in the memory-mapped file, at the
    file's unaligned offsets. A CPU runs such a model measurably slower than the same
    weights in memory of their own (SmolLM2-135M on 2 threads: about 5%, nearly all of it
    the mapping's; ``benchmarks/weight_memory.py``), while a child the pipeline builds or
    loads owns its weights. A parent timed in place would lend its slowness to every speedup
    measured against it, so models are timed from a copy when this is false.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu" and (
            not tensor.untyped_storage().resizable() or tensor.data_ptr() % ALIGNMENT
        ):
            return False
    return True


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
