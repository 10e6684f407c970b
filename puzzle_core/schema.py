"""The run configuration (``puzzle run CONFIG``): one section per pipeline stage.

Plugin fields (``*Choice``) are picked by name; everything else has a default, so a
config only says what differs. ``puzzle config show FILE`` prints the resolved whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from puzzle_core.config import (
    ArchitectureChoice,
    BlockVariantsChoice,
    CostModelChoice,
    DistillationLossChoice,
    EvaluatorChoice,
    ExecutorChoice,
    ScorerChoice,
    SolverChoice,
    read_yaml,
    structure,
)
from puzzle_core.search import Constraint, LayerRule, Objective

TorchDtype = Literal["float32", "bfloat16"]


def _choice(type_, name: str, **options):
    """A default plugin choice, structured lazily so defaults need no registry at import."""
    return attrs.Factory(lambda: structure({"name": name, **options}, type_))


@attrs.frozen
class ParentSection:
    """The model to compress."""

    source: str = "smollm2-135m"  # an embedded alias, a local HF folder or a .gguf file
    architecture: ArchitectureChoice | None = None  # None: detected from the parent's config
    dtype: TorchDtype = "float32"
    trust_remote_code: bool = False  # only ever set when the user asks


@attrs.frozen
class DataSection:
    """Where training, validation and test text comes from."""

    corpus: str = "demo"  # 'demo' (prepared Debian texts), 'synthetic' (random tokens, tests), or a file/folder
    seq_len: int = 128
    validation_fraction: float = 0.05


@attrs.frozen
class LibrarySection:
    """Stage 1: blockwise local distillation (BLD) of every alternative block."""

    variants: BlockVariantsChoice | None = None  # None: the architecture's default provider
    mode: Literal["decoupled", "coupled"] = "decoupled"
    tokens: int = 16384  # training tokens per block
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    activation_dtype: TorchDtype = "bfloat16"
    shard_tokens: int = 8192
    loss: DistillationLossChoice = _choice(DistillationLossChoice, "normalized_mse")
    executor: ExecutorChoice = _choice(ExecutorChoice, "local")


@attrs.frozen
class ScoringSection:
    """Stage 2a: replace-1-block quality scores."""

    scorers: list[ScorerChoice] = attrs.Factory(lambda: [structure("kl", ScorerChoice)])
    tokens: int = 4096  # validation tokens scored per variant
    batch_size: int = 8  # sequences per forward
    max_cache_mib: int = 4096  # bound on the cached parent activations (see puzzle_core.scoring)
    executor: ExecutorChoice = _choice(ExecutorChoice, "local")  # jobs: one per layer


def _at_least(minimum: int):
    def check(_instance, attribute, value):
        if value < minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, got {value}")

    return check


def _device(_instance, attribute, value):
    if value not in ("cpu", "cuda", "auto") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError(f"{attribute.name} must be 'cpu', 'cuda', 'cuda:<index>' or 'auto', got {value!r}")


@attrs.frozen
class Scenario:
    """The inference workload the child is made fast for.

    ``decode_len`` counts generated tokens per sequence: the prefill pass emits the first,
    then ``decode_len - 1`` single-token steps follow. ``dtype`` is the weights' and GEMMs'
    precision, ``kv_dtype`` the KV cache's. ``device`` and ``threads`` are where cost
    models that measure (``measured``) run: 'auto' is CUDA when available, else CPU.
    """

    batch_size: int = attrs.field(default=1, validator=_at_least(1))
    prefill_len: int = attrs.field(default=128, validator=_at_least(1))
    decode_len: int = attrs.field(default=128, validator=_at_least(1))
    dtype: Literal["fp32", "bf16", "fp8"] = "bf16"
    kv_dtype: Literal["fp32", "bf16", "fp8"] = "bf16"
    device: str = attrs.field(default="cpu", validator=_device)
    threads: int = attrs.field(default=2, validator=_at_least(1))


@attrs.frozen
class CostSection:
    """Stage 2a: per-block costs for the scenario."""

    model: CostModelChoice = _choice(CostModelChoice, "measured")


@attrs.frozen
class SearchSection:
    """Stage 2b: choosing one block per layer.

    ``constraints`` bound whole-model totals (fixed costs included): ``stats.memory_mib<=80000``,
    ``10<=stats.runtime_ms<=50``, ``{stats.runtime_ms: [10, 50]}``, ``throughput>=6000 tokens/s``,
    ``speedup>=1.5``. ``speedups`` sweeps runtime budgets for the frontier plot.
    """

    solver: SolverChoice = _choice(SolverChoice, "mip")
    objective: Objective = attrs.Factory(lambda: Objective.parse("metrics.kl"))  # or 'metrics.kl + 0.5*metrics.lm_loss'
    minimize: bool = True
    constraints: list[Constraint] = attrs.Factory(list)
    speedup: float | None = None  # runtime budget = parent runtime / speedup
    speedups: list[float] = attrs.Factory(list)  # frontier sweep (two or more: solutions/frontier.png)
    layers: list[LayerRule] = attrs.Factory(list)  # per-layer rules, e.g. {layers: [0, -1], keep_attention: true}
    num_solutions: int = 1
    min_diversity: int = 1  # each further solution differs from every earlier one in this many layers
    baselines: list[SolverChoice] = attrs.Factory(list)


@attrs.frozen
class GKDSection:
    """Stage 3: global knowledge distillation of the assembled child."""

    enabled: bool = True
    tokens: int = 65536
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_fraction: float = 0.05
    checkpoint_every: int = 50
    bf16: bool = False
    lora_rank: int = 0  # 0: full fine-tuning
    losses: list[DistillationLossChoice] = attrs.Factory(
        lambda: [structure("cosine", DistillationLossChoice), structure("kl", DistillationLossChoice)]
    )
    executor: ExecutorChoice = _choice(ExecutorChoice, "local")


@attrs.frozen
class EvaluationSection:
    """Stage 4: measuring the parent and the children."""

    evaluators: list[EvaluatorChoice] = attrs.Factory(list)


@attrs.frozen
class PuzzleConfig:
    """A whole run."""

    parent: ParentSection = attrs.Factory(ParentSection)
    seed: int = 0
    threads: int = 2
    data: DataSection = attrs.Factory(DataSection)
    library: LibrarySection = attrs.Factory(LibrarySection)
    scoring: ScoringSection = attrs.Factory(ScoringSection)
    scenario: Scenario = attrs.Factory(Scenario)
    costs: CostSection = attrs.Factory(CostSection)
    search: SearchSection = attrs.Factory(SearchSection)
    gkd: GKDSection = attrs.Factory(GKDSection)
    evaluation: EvaluationSection = attrs.Factory(EvaluationSection)


def load_config(path: str | Path) -> PuzzleConfig:
    """Read and validate a run config; every problem is reported at once."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        from puzzle_core.errors import ConfigError

        raise ConfigError([f"at $: expected a mapping of sections, got {type(data).__name__}"], str(path))
    return structure(data, PuzzleConfig, source=str(path))
