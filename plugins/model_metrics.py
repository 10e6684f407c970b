"""Our own model metrics: ``kl_to_parent`` on the test split, measured ``throughput`` of the scenario.

``kl_to_parent`` is the paper's preferred quality signal, measured on text no stage
trained or scored on. ``throughput`` runs the scenario end to end (prefill of
``prefill_len`` tokens, then greedy decoding with a KV cache to exactly ``decode_len``
new tokens per sequence) and reports generated tokens per second, the same definition
the search uses for throughput targets (:func:`puzzle_core.search.throughput`), so
measured and predicted speedups compare directly.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import attrs
import torch

from puzzle_core.api import (
    EvalContext,
    Evaluator,
    EvaluatorPlugin,
    LoadedModel,
    Spread,
    TimedGenerate,
    UserError,
    hookimpl,
    interleaved,
    owns_weights,
    scenario_prompt,
    summarise,
    throughput,
    torch_threads,
)

SCENARIO_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------- KL to the parent


@attrs.frozen
class KLOptions:
    tokens: int | None = 8192  # test tokens compared (None: the whole test split)
    seq_len: int = attrs.field(default=128, validator=attrs.validators.ge(2))
    batch_size: int = attrs.field(default=4, validator=attrs.validators.ge(1))


class KLToParent(Evaluator):
    """Mean per-token KL(parent || model) of next-token distributions, and the model's own LM loss."""

    def __init__(self, options: KLOptions):
        self.options = options

    def evaluate(self, model: LoadedModel, context: EvalContext) -> dict[str, float]:
        parent = context.require_parent("kl_to_parent")
        corpus = context.require_corpus("kl_to_parent")
        options = self.options
        kl_sum = loss_sum = 0.0
        tokens = targets = 0
        training = model.model.training, parent.model.training
        model.model.eval()
        parent.model.eval()
        try:
            with torch.no_grad():
                for ids in corpus.batches("test", options.seq_len, options.batch_size, options.tokens, context.seed):
                    student = torch.log_softmax(model.model(input_ids=ids.to(_device_of(model.model))).logits.float(), -1)
                    teacher = torch.log_softmax(parent.model(input_ids=ids.to(_device_of(parent.model))).logits.float(), -1)
                    teacher = teacher.to(student.device)
                    kl_sum += float(torch.nn.functional.kl_div(student, teacher, reduction="sum", log_target=True))
                    tokens += ids.numel()
                    labels = ids[:, 1:].to(student.device)
                    loss_sum += float(-student[:, :-1].gather(-1, labels[..., None]).sum())
                    targets += labels.numel()
        finally:
            model.model.train(training[0])
            parent.model.train(training[1])
        return {"kl_to_parent": kl_sum / tokens, "test_lm_loss": loss_sum / targets}


# ---------------------------------------------------------------- throughput


@attrs.frozen
class ThroughputOptions:
    warmup: int = attrs.field(default=1, validator=attrs.validators.ge(0))  # untimed rounds first
    repeats: int = attrs.field(default=7, validator=attrs.validators.ge(1))  # timed rounds (model and parent once each)
    threads: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # 0: the scenario's threads
    statistic: Literal["median", "min"] = "median"  # of the model's own times, for throughput_tok_s and latency_s
    clock: Literal["wall", "process"] = "wall"  # 'process': this process's CPU time (CPU only)


class Throughput(Evaluator):
    """The scenario end to end with ``generate``, timed in rounds that alternate the model with the parent.

    ``measured_speedup`` is the median over rounds of parent time / model time, each
    round's two runs back to back (their order alternating), so load and clock drift on
    the machine cancel in the ratio; its quartiles, range and number of rounds are
    reported as ``measured_speedup_q1/_q3/_min/_max/_rounds``. ``throughput_tok_s`` =
    batch x decode_len / the model's own time (median, or the fastest with
    ``statistic: min``); ``parent_throughput_tok_s`` the same for the parent, measured
    alongside. Evaluating the parent pairs it with itself: its speedup spread is the
    measurement's noise. Without a parent in the context only the model is timed. A model
    whose weights are still in its memory-mapped checkpoint is timed from a copy in memory
    of its own, as the children are (``owns_weights``).
    """

    architecture_only = True  # fixed-length greedy decoding: the time does not depend on the weights

    def __init__(self, options: ThroughputOptions):
        self.options = options
        self._converted: tuple[Any, Any] | None = None  # (parent module, its copy in the scenario's dtype)

    @staticmethod
    def _on(module, device: torch.device, dtype: torch.dtype):
        """``module`` on the scenario's device and dtype, owning its weights (``owns_weights``).

        A copy when it is not (the caller's model stays as it is): a parent read in place
        from its checkpoint would otherwise run slower than the children timed against it.
        """
        if _device_of(module) == device and next(module.parameters()).dtype == dtype and owns_weights(module):
            return module
        return copy.deepcopy(module).to(device=device, dtype=dtype)

    def _parent(self, context: EvalContext, device: torch.device, dtype: torch.dtype):
        if context.parent is None:
            return None
        module = context.parent.model
        if self._converted is None or self._converted[0] is not module:
            self._converted = (module, self._on(module, device, dtype))
        return self._converted[1]

    def evaluate(self, model: LoadedModel, context: EvalContext) -> dict[str, float]:
        scenario = context.scenario
        options = self.options
        device = _scenario_device(scenario.device)
        dtype = _scenario_dtype(scenario.dtype)
        if not hasattr(model.model, "generate"):
            raise UserError(f"The model from '{model.source}' has no generate(); throughput needs one with a KV cache.")
        subject = self._on(model.model, device, dtype)
        parent = self._parent(context, device, dtype)
        prompt = scenario_prompt(model.shape.vocab_size, scenario, str(device), context.seed)
        models = [subject] if parent is None else [subject, parent]
        runs = [TimedGenerate(m, prompt, scenario.decode_len, str(device), options.clock, model.tokenizer)
                for m in models]
        modes = {id(m): (m, m.training) for m in models}.values()
        for module, _ in modes:
            module.eval()
        try:
            with torch_threads(options.threads or scenario.threads), torch.inference_mode():
                timings = interleaved(runs, options.repeats, options.warmup)
        finally:
            for module, training in modes:
                module.train(training)
        latency_ms = summarise([t.total_ms for t in timings[0]], options.statistic)
        metrics = {
            "throughput_tok_s": throughput(latency_ms, attrs.asdict(scenario)),
            "latency_s": latency_ms / 1e3,
            "prefill_s": summarise([t.prefill_ms for t in timings[0]], options.statistic) / 1e3,
        }
        if parent is not None:
            ratios = Spread.of([p.total_ms / m.total_ms for m, p in zip(*timings)])
            metrics.update({
                "measured_speedup": ratios.median,
                "measured_speedup_q1": ratios.q1,
                "measured_speedup_q3": ratios.q3,
                "measured_speedup_min": ratios.low,
                "measured_speedup_max": ratios.high,
                "measured_speedup_rounds": ratios.count,
                "parent_throughput_tok_s": throughput(summarise([t.total_ms for t in timings[1]], options.statistic), attrs.asdict(scenario)),
            })
        return metrics


def _scenario_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"scenario.device is '{name}', but torch sees no CUDA device here. Use 'auto' or 'cpu'.")
    return device


def _scenario_dtype(name: str) -> torch.dtype:
    if name == "fp8":
        warnings.warn("measured throughput has no fp8 path in plain PyTorch; measuring bf16 instead", stacklevel=3)
        return torch.bfloat16
    return SCENARIO_DTYPES[name]


@hookimpl
def puzzle_evaluators() -> list[EvaluatorPlugin]:
    return [
        EvaluatorPlugin(
            name="kl_to_parent",
            implementation=KLToParent,
            options=KLOptions,
            description="KL(parent || model) per token on the test split, and the model's test LM loss",
        ),
        EvaluatorPlugin(
            name="throughput",
            implementation=Throughput,
            options=ThroughputOptions,
            description="measured scenario throughput (generate: prefill + greedy decode with KV cache) and the "
            "speedup over the parent, paired round by round",
        ),
    ]
