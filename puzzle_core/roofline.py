"""Analytic roofline cost models: a GPU's spec sheet (:class:`GPUSpec`) priced op by op.

Every op of a block (norms, QKV / O projections, attention over the KV cache, FFN
gate/up/down, linear replacements) is priced for the scenario's prefill and for each
decode step as ``max(FLOPs / achieved compute, bytes / achieved bandwidth)`` plus a
kernel launch overhead, where "achieved" is the spec-sheet peak times an efficiency
factor per op kind. Decode steps are priced one by one because attention reads a KV
cache that grows every step.

A new GPU is a :class:`GPUSpec` and one record (the built-in ``h100`` and ``rtx4090``
are made this way); a third-party plugin needs only::

    from puzzle_core.api import CostModelPlugin, GPUSpec, hookimpl, roofline_cost_model

    MY_GPU = GPUSpec(name="My GPU", memory_gib=48, bandwidth_gbs=960,
                     peak_tflops={"fp32": 91.6, "bf16": 181.0, "fp8": 362.0}, source="spec sheet")

    @hookimpl
    def puzzle_cost_models() -> list[CostModelPlugin]:
        return [roofline_cost_model("my_gpu", MY_GPU)]

Conventions (documented so numbers can be checked by hand):

- ``decode_len`` counts generated tokens. The prefill pass emits the first one, so there
  are ``decode_len - 1`` single-token decode steps; step ``s`` attends over ``prefill_len + s``
  cached positions. The prefill computes logits for the last position only.
- Weights are stored and multiplied in the scenario ``dtype``; in ``fp8`` scenarios
  activations, norms and attention math stay in bf16 (as FP8 serving engines do), only
  the GEMMs run at the FP8 tensor-core rate. ``fp32`` uses the non-tensor FP32 rate.
- ``memory_mib`` = weights + the KV cache of ``batch_size * (prefill_len + decode_len)``
  positions, on one GPU.
- Tensor parallelism (``scenario.tensor_parallel`` = ``t`` GPUs per model, Megatron
  style): each GPU holds ``1/t`` of the query heads, of the FFN channels, of the rows of
  linear replacements and of the vocabulary; KV heads are split too, and replicated when
  there are fewer than ``t``; norms run everywhere. Each attention and each FFN sub-block
  that is not a no-op ends in an all-reduce of its output (``tokens x hidden``), the
  embedding in one more, and the LM head gathers its logits. A ring all-reduce moves
  ``2 (t-1)/t`` of the data through each GPU's link (``GPUSpec.interconnect_gbs``, one
  direction, e.g. NVLink) at ``allreduce_efficiency`` of it, plus ``allreduce_latency_us``
  per collective. Costs are those of one GPU of the group (runtime is the group's, memory
  per GPU); ``num_params`` stays the whole model's. :meth:`RooflineCostModel.memory_capacity_mib` is the GPU memory a child must
  fit in (the cost stage checks it and records whether the parent and the smallest
  possible child fit).
"""

from __future__ import annotations

import typing
from typing import Literal, Mapping

import attrs

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec
from puzzle_core.dtypes import DTYPE_BYTES, ScenarioDtype
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Costs, CostModel, ModelFamily, ModelShape
from puzzle_core.records import CostModelPlugin
from puzzle_core.scenario import Scenario

MIB = 2**20
SCENARIO_DTYPES: tuple[str, ...] = typing.get_args(ScenarioDtype)

OpKind = Literal["gemm", "attention", "elementwise", "communication"]


def _positive(_instance, attribute, value):
    if not value > 0:
        raise ValueError(f"GPUSpec {attribute.name} must be positive, got {value!r}")


def _peaks(_instance, _attribute, value):
    """Keys are scenario dtypes (anything else could never be priced) and values positive TFLOPS."""
    unknown = sorted(set(value) - set(SCENARIO_DTYPES))
    if unknown:
        raise ValueError(
            f"GPUSpec peak_tflops has {', '.join(repr(k) for k in unknown)}, which no scenario can ask for; "
            f"scenario dtypes are {', '.join(SCENARIO_DTYPES)}. Leave the others out."
        )
    if not value or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise ValueError(f"GPUSpec peak_tflops must give a positive TFLOPS figure per dtype, got {dict(value)!r}")


@attrs.frozen
class GPUSpec:
    """What a roofline needs to know about a GPU, from its spec sheet.

    ``peak_tflops``: dense (non-sparse) throughput per scenario dtype (``fp32``, ``bf16``,
    ``fp8``), tensor cores for bf16/fp8; a dtype the GPU cannot run is simply absent, and
    ``puzzle config validate`` refuses a scenario that needs it. ``interconnect_gbs``
    prices the all-reduces of tensor parallelism; a GPU without it is priced alone only.
    """

    name: str
    memory_gib: float = attrs.field(validator=_positive)
    bandwidth_gbs: float = attrs.field(validator=_positive)  # memory bandwidth, GB/s (10^9 bytes)
    peak_tflops: Mapping[str, float] = attrs.field(validator=_peaks)
    source: str = ""
    # GPU-to-GPU bandwidth of one GPU in one direction, GB/s (NVLink, else PCIe); None: no tensor parallelism
    interconnect_gbs: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))


def _fraction(_instance, attribute, value):
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


def _non_negative(_instance, attribute, value):
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class RooflineOptions:
    """Fractions of the spec-sheet peaks that kernels of each kind actually reach."""

    gemm_compute_efficiency: float = attrs.field(default=0.7, validator=_fraction)
    gemm_memory_efficiency: float = attrs.field(default=0.85, validator=_fraction)
    attention_compute_efficiency: float = attrs.field(default=0.5, validator=_fraction)
    attention_memory_efficiency: float = attrs.field(default=0.8, validator=_fraction)
    elementwise_memory_efficiency: float = attrs.field(default=0.7, validator=_fraction)
    kernel_overhead_us: float = attrs.field(default=2.0, validator=_non_negative)  # per kernel launch
    usable_memory_fraction: float = attrs.field(default=0.9, validator=_fraction)  # rest: activations, workspace
    # Tensor parallelism (assumed, not measured): share of the link bandwidth a ring all-reduce reaches, and its
    # fixed latency per collective (NCCL's small-message all-reduce within one node is of the order of 10 us).
    allreduce_efficiency: float = attrs.field(default=0.7, validator=_fraction)
    allreduce_latency_us: float = attrs.field(default=10.0, validator=_non_negative)


@attrs.frozen
class Op:
    """One kernel: its kind, arithmetic and memory traffic."""

    name: str
    kind: OpKind
    flops: float
    bytes: float


@attrs.frozen
class Precision:
    """Bytes per element of weights, activations and the KV cache; dtype of the GEMMs."""

    weight: int
    activation: int
    kv: int
    gemm_dtype: str
    attention_dtype: str

    @classmethod
    def of(cls, scenario: Scenario) -> Precision:
        activation_dtype = "bf16" if scenario.dtype == "fp8" else scenario.dtype
        return cls(
            weight=DTYPE_BYTES[scenario.dtype],
            activation=DTYPE_BYTES[activation_dtype],
            kv=DTYPE_BYTES[scenario.kv_dtype],
            gemm_dtype=scenario.dtype,
            attention_dtype=activation_dtype,
        )


# ---------------------------------------------------------------- shapes of blocks


def kv_heads(shape: ModelShape, attention: AttentionSpec) -> int:
    """KV heads of an attention sub-block (0 for linear and no-op: they keep no cache)."""
    if attention.kind != "attention":
        return 0
    group = attention.n_heads_in_group
    if shape.num_attention_heads % group:
        raise UserError(
            f"Attention variant {attention.id} groups {group} query heads per KV head, but the model has "
            f"{shape.num_attention_heads} heads, which {group} does not divide. Use a divisor of "
            f"{shape.num_attention_heads}."
        )
    return shape.num_attention_heads // group


def ffn_size(ffn: FFNSpec) -> int:
    """Intermediate size of an FFN sub-block (0 for linear and no-op)."""
    return ffn.intermediate_size if ffn.kind == "ffn" else 0


def shard(size: int, tp: int) -> int:
    """One GPU's share of ``size`` split ``tp`` ways (rounded up: the largest share sets the time)."""
    return -(-size // tp)


def check_tensor_parallel(shape: ModelShape, tp: int) -> None:
    """Query heads must split evenly over the tensor-parallel group."""
    if shape.num_attention_heads % tp:
        raise UserError(
            f"scenario.tensor_parallel is {tp}, but the model's {shape.num_attention_heads} attention heads do not "
            f"split evenly over {tp} GPUs. Use a divisor of {shape.num_attention_heads}."
        )


def gpu_kv_heads(shape: ModelShape, attention: AttentionSpec, tp: int = 1) -> int:
    """KV heads one GPU of a tensor-parallel group holds (replicated when there are fewer than ``tp``)."""
    kv = kv_heads(shape, attention)
    return shard(kv, tp) if kv else 0


def block_params(shape: ModelShape, block: BlockSpec, tp: int = 1) -> int:
    """Parameters of a Llama-style block without biases (norm weights included); ``tp > 1``: one GPU's share."""
    h, d = shape.hidden_size, shape.head_dim
    attention = block.attention
    if attention.kind == "attention":
        q = shape.num_attention_heads // tp * d
        attn = h + h * q + 2 * h * gpu_kv_heads(shape, attention, tp) * d + q * h
    elif attention.kind == "linear":
        attn = h + shard(h, tp) * h
    else:
        attn = 0
    ffn = block.ffn
    mlp = h + 3 * h * shard(ffn_size(ffn), tp) if ffn.kind == "ffn" else h + shard(h, tp) * h if ffn.kind == "linear" else 0
    return attn + mlp


def fixed_params(shape: ModelShape, tp: int = 1) -> int:
    """Embedding, final norm and (unless tied) the LM head; ``tp > 1``: one GPU's share (vocabulary split)."""
    table = shard(shape.vocab_size, tp) * shape.hidden_size
    return table * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


def model_params(shape: ModelShape) -> int:
    """Every parameter of a model of ``shape`` (tied embeddings counted once), from its config alone."""
    return fixed_params(shape) + sum(block_params(shape, block) for block in shape.blocks)


def kv_cache_bytes(shape: ModelShape, attention: AttentionSpec, scenario: Scenario) -> int:
    """KV cache of one attention sub-block holding every position of the scenario (on one GPU of the group)."""
    positions = scenario.batch_size * (scenario.prefill_len + scenario.decode_len)
    heads = gpu_kv_heads(shape, attention, scenario.tensor_parallel)
    return 2 * positions * heads * shape.head_dim * DTYPE_BYTES[scenario.kv_dtype]


# ---------------------------------------------------------------- ops


def gemm(name: str, tokens: int, k: int, n: int, p: Precision) -> Op:
    """``(tokens x k) @ (k x n)``: weights read once, activations in and out."""
    return Op(name, "gemm", 2.0 * tokens * k * n, k * n * p.weight + tokens * (k + n) * p.activation)


def norm(name: str, tokens: int, hidden: int, p: Precision) -> Op:
    """RMSNorm fused with the residual add: read residual and delta, write both results."""
    return Op(name, "elementwise", 5.0 * tokens * hidden, 4 * tokens * hidden * p.activation + hidden * p.weight)


def attention_core(batch: int, new: int, context: int, heads: int, kv: int, head_dim: int, p: Precision) -> Op:
    """Scores, softmax and weighted sum for ``new`` queries per sequence over ``context`` keys (causal).

    Flash-style: Q read and O written once, the cache (``context`` positions) read once,
    the ``new`` keys/values appended to it.
    """
    pairs = new * (context - new) + new * (new + 1) / 2  # causal (query, key) pairs per sequence and head
    flops = 4.0 * batch * heads * head_dim * pairs
    moved = 2 * batch * new * heads * head_dim * p.activation + batch * (context + new) * 2 * kv * head_dim * p.kv
    return Op("attention", "attention", flops, moved)


def all_reduce(name: str, elements: int, tp: int, p: Precision) -> list[Op]:
    """A ring all-reduce of ``elements`` activations over ``tp`` GPUs: bytes through each GPU's link (none alone)."""
    if tp == 1:
        return []
    return [Op(name, "communication", 0.0, 2 * (tp - 1) / tp * elements * p.activation)]


def block_ops(shape: ModelShape, block: BlockSpec, batch: int, new: int, context: int, p: Precision,
              tp: int = 1) -> list[Op]:
    """The kernels one GPU of a ``tp``-way group runs for a block on ``new`` tokens per sequence, ``context`` visible."""
    tokens = batch * new
    h, d, heads = shape.hidden_size, shape.head_dim, shape.num_attention_heads // tp
    ops: list[Op] = []
    attention = block.attention
    if attention.kind == "attention":
        kv = gpu_kv_heads(shape, attention, tp)
        ops += [
            norm("input_norm", tokens, h, p),
            gemm("qkv_proj", tokens, h, (heads + 2 * kv) * d, p),
            attention_core(batch, new, context, heads, kv, d, p),
            gemm("o_proj", tokens, heads * d, h, p),
            *all_reduce("attention_all_reduce", tokens * h, tp, p),
        ]
    elif attention.kind == "linear":
        ops += [norm("input_norm", tokens, h, p), gemm("linear_attn", tokens, shard(h, tp), h, p),
                *all_reduce("attention_all_reduce", tokens * h, tp, p)]
    ffn = block.ffn
    if ffn.kind == "ffn":
        size = shard(ffn_size(ffn), tp)
        ops += [
            norm("post_attention_norm", tokens, h, p),
            gemm("gate_up_proj", tokens, h, 2 * size, p),
            Op("swiglu", "elementwise", 4.0 * tokens * size, 3 * tokens * size * p.activation),
            gemm("down_proj", tokens, size, h, p),
            *all_reduce("ffn_all_reduce", tokens * h, tp, p),
        ]
    elif ffn.kind == "linear":
        ops += [norm("post_attention_norm", tokens, h, p), gemm("linear_mlp", tokens, shard(h, tp), h, p),
                *all_reduce("ffn_all_reduce", tokens * h, tp, p)]
    return ops


def fixed_ops(shape: ModelShape, batch: int, new: int, p: Precision, tp: int = 1) -> list[Op]:
    """Embedding lookup, final norm and the LM head (last position only), on one GPU of a ``tp``-way group."""
    tokens, h, vocab = batch * new, shape.hidden_size, shard(shape.vocab_size, tp)
    ops = [
        Op("embedding", "elementwise", 0.0, tokens * h * (p.weight + p.activation)),
        *all_reduce("embedding_all_reduce", tokens * h, tp, p),
        norm("final_norm", tokens, h, p),
        gemm("lm_head", batch, h, vocab, p),
    ]
    if tp > 1:  # all-gather of the logits: every GPU receives the other shares
        ops.append(Op("logits_all_gather", "communication", 0.0, (tp - 1) * batch * vocab * p.activation))
    return ops


# ---------------------------------------------------------------- the model


class RooflineCostModel(CostModel):
    """Prices blocks on one GPU from FLOPs and bytes; see the module docstring."""

    def __init__(self, gpu: GPUSpec, options: RooflineOptions | None = None):
        self.gpu = gpu
        self.options = options or RooflineOptions()

    # ---- pricing

    def _peak_flops(self, dtype: str) -> float:
        try:
            return self.gpu.peak_tflops[dtype] * 1e12
        except KeyError:
            raise UserError(
                f"The {self.gpu.name} has no {dtype} throughput on its spec sheet (it supports "
                f"{', '.join(sorted(self.gpu.peak_tflops))}). Set scenario.dtype to one of those."
            ) from None

    def op_seconds(self, op: Op, p: Precision) -> float:
        """Roofline time of one kernel, launch overhead included."""
        o = self.options
        bandwidth = self.gpu.bandwidth_gbs * 1e9
        if op.kind == "gemm":
            compute = op.flops / (self._peak_flops(p.gemm_dtype) * o.gemm_compute_efficiency)
            memory = op.bytes / (bandwidth * o.gemm_memory_efficiency)
        elif op.kind == "attention":
            compute = op.flops / (self._peak_flops(p.attention_dtype) * o.attention_compute_efficiency)
            memory = op.bytes / (bandwidth * o.attention_memory_efficiency)
        elif op.kind == "communication":
            link = (self.gpu.interconnect_gbs or 0.0) * 1e9 * o.allreduce_efficiency
            return op.bytes / link + o.allreduce_latency_us * 1e-6
        else:
            compute, memory = 0.0, op.bytes / (bandwidth * o.elementwise_memory_efficiency)
        return max(compute, memory) + o.kernel_overhead_us * 1e-6

    def _seconds(self, ops: list[Op], p: Precision) -> float:
        return sum(self.op_seconds(op, p) for op in ops)

    def phase_ms(self, ops_at, scenario: Scenario) -> tuple[float, float]:
        """``(prefill_ms, decode_ms)`` for ``ops_at(batch, new, context)`` over the scenario.

        Only attention depends on the context length, so the other kernels of a decode
        step are priced once and the attention kernel once per step.
        """
        p = Precision.of(scenario)
        batch, prompt = scenario.batch_size, scenario.prefill_len
        prefill = self._seconds(ops_at(batch, prompt, prompt), p)
        steps = scenario.decode_len - 1
        if steps <= 0:
            return prefill * 1e3, 0.0
        first = ops_at(batch, 1, prompt + 1)
        decode = steps * self._seconds([op for op in first if op.kind != "attention"], p)
        if any(op.kind == "attention" for op in first):
            for step in range(1, steps + 1):
                for op in ops_at(batch, 1, prompt + step):
                    if op.kind == "attention":
                        decode += self.op_seconds(op, p)
        return prefill * 1e3, decode * 1e3

    # ---- the CostModel interface

    def block_costs(
        self, shape: ModelShape, block: BlockSpec, scenario: Scenario, family: ModelFamily | None = None
    ) -> Costs:
        p, tp = Precision.of(scenario), scenario.tensor_parallel
        check_tensor_parallel(shape, tp)
        prefill_ms, decode_ms = self.phase_ms(
            lambda batch, new, context: block_ops(shape, block, batch, new, context, p, tp), scenario
        )
        params = block_params(shape, block)
        kv_bytes = kv_cache_bytes(shape, block.attention, scenario)
        return {
            "runtime_ms": prefill_ms + decode_ms,
            "prefill_ms": prefill_ms,
            "decode_ms": decode_ms,
            "memory_mib": (block_params(shape, block, tp) * p.weight + kv_bytes) / MIB,
            "kv_cache_mib": kv_bytes / MIB,
            "num_params": params,
            "num_kv_heads": kv_heads(shape, block.attention),
            "ffn_intermediate_size": ffn_size(block.ffn),
        }

    def fixed_costs(self, shape: ModelShape, scenario: Scenario, family: ModelFamily | None = None) -> Costs:
        p, tp = Precision.of(scenario), scenario.tensor_parallel
        check_tensor_parallel(shape, tp)
        prefill_ms, decode_ms = self.phase_ms(lambda batch, new, context: fixed_ops(shape, batch, new, p, tp), scenario)
        params = fixed_params(shape)
        return {
            "runtime_ms": prefill_ms + decode_ms,
            "prefill_ms": prefill_ms,
            "decode_ms": decode_ms,
            "memory_mib": fixed_params(shape, tp) * p.weight / MIB,
            "kv_cache_mib": 0.0,
            "num_params": params,
            "num_kv_heads": 0,
            "ffn_intermediate_size": 0,
        }

    def memory_capacity_mib(self, scenario: Scenario) -> float:
        return self.gpu.memory_gib * 1024 * self.options.usable_memory_fraction

    def check_scenario(self, scenario: Scenario) -> list[str]:
        p = Precision.of(scenario)
        missing = sorted({p.gemm_dtype, p.attention_dtype} - set(self.gpu.peak_tflops))
        problems = []
        if scenario.tensor_parallel > 1 and self.gpu.interconnect_gbs is None:
            problems.append(
                f"scenario.tensor_parallel is {scenario.tensor_parallel}, but the spec sheet of the {self.gpu.name} "
                f"gives no GPU-to-GPU bandwidth (GPUSpec.interconnect_gbs) to price its all-reduces. Set "
                f"scenario.tensor_parallel to 1, or use a GPU spec with interconnect_gbs."
            )
        if not missing:
            return problems
        return problems + [
            f"the {self.gpu.name} has no {' or '.join(missing)} throughput on its spec sheet, which scenario.dtype "
            f"'{scenario.dtype}' needs (it supports {', '.join(sorted(self.gpu.peak_tflops))}). Set scenario.dtype "
            f"to one of those, or pick another cost model."
        ]


def roofline_cost_model(name: str, gpu: GPUSpec, description: str = "") -> CostModelPlugin:
    """The plugin record of a roofline cost model for ``gpu`` (options: :class:`RooflineOptions`)."""
    peaks = ", ".join(f"{dtype} {tflops:g} TFLOPS" for dtype, tflops in gpu.peak_tflops.items())

    def build(options: RooflineOptions) -> RooflineCostModel:
        return RooflineCostModel(gpu, options)

    return CostModelPlugin(
        name=name,
        implementation=build,
        options=RooflineOptions,
        description=description
        or f"Analytic roofline for the {gpu.name} ({gpu.bandwidth_gbs:g} GB/s, {gpu.memory_gib:g} GiB; {peaks})",
    )

