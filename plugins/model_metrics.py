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
import statistics
import time
import warnings
from typing import Literal

import attrs
import torch

from puzzle_core.api import (
    EvalContext,
    Evaluator,
    EvaluatorPlugin,
    LoadedModel,
    UserError,
    hookimpl,
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
    warmup: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    repeats: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    threads: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # 0: the scenario's threads
    statistic: Literal["median", "min"] = "median"  # min: robust on a machine other work keeps busy


class Throughput(Evaluator):
    """End-to-end time of the scenario (median or min of repeats); ``throughput_tok_s`` = batch x decode_len / time."""

    def __init__(self, options: ThroughputOptions):
        self.options = options

    def evaluate(self, model: LoadedModel, context: EvalContext) -> dict[str, float]:
        scenario = context.scenario
        device = _scenario_device(scenario.device)
        dtype = _scenario_dtype(scenario.dtype)
        subject = model.model
        if _device_of(subject) != device or next(subject.parameters()).dtype != dtype:
            subject = copy.deepcopy(subject).to(device=device, dtype=dtype)  # the caller's model stays as it is
        if not hasattr(subject, "generate"):
            raise UserError(f"The model from '{model.source}' has no generate(); throughput needs one with a KV cache.")
        generator = torch.Generator().manual_seed(context.seed)
        vocab = model.shape.vocab_size
        prompt = torch.randint(0, vocab, (scenario.batch_size, scenario.prefill_len), generator=generator).to(device)
        settings = _generation_config(scenario.decode_len, model.tokenizer)
        training = subject.training
        subject.eval()
        try:
            with torch_threads(self.options.threads or scenario.threads), torch.no_grad():
                for _ in range(self.options.warmup):
                    self._generate(subject, prompt, settings)
                latencies = [self._timed(lambda: self._generate(subject, prompt, settings), device)
                             for _ in range(self.options.repeats)]
                prefills = [self._timed(lambda: subject(input_ids=prompt, use_cache=True), device)
                            for _ in range(self.options.repeats)]
        finally:
            subject.train(training)
        reduce = statistics.median if self.options.statistic == "median" else min
        latency = reduce(latencies)
        return {
            "throughput_tok_s": throughput(1000.0 * latency, attrs.asdict(scenario)),
            "latency_s": latency,
            "prefill_s": reduce(prefills),
        }

    @staticmethod
    def _generate(model, prompt: torch.Tensor, settings) -> None:
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
        made = output.shape[1] - prompt.shape[1]
        if made != settings.max_new_tokens:
            raise RuntimeError(f"generate() made {made} tokens instead of {settings.max_new_tokens}")

    @staticmethod
    def _timed(call, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started


def _generation_config(decode_len: int, tokenizer):
    """Greedy decoding of exactly ``decode_len`` tokens (no end-of-text stop), with a KV cache."""
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
    )


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
            description="measured scenario throughput (prefill + greedy decode with KV cache), median of repeats",
        ),
    ]
