"""The run configuration (``puzzle run CONFIG``): one section per pipeline stage.

Plugin fields (``*Choice``) are picked by name; everything else has a default, so a
config only says what differs. ``puzzle config show FILE`` prints the resolved whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import attrs

from puzzle_core.choices import (
    ArchitectureChoice,
    CorpusChoice,
    BlockVariantsChoice,
    CostModelChoice,
    DistillationLossChoice,
    EvaluatorChoice,
    ExecutorChoice,
    ScorerChoice,
    SolverChoice,
    corpus_choice,
)
from puzzle_core.config import CONVERTER, OMITTED_WHILE_UNSET, apply_overrides, deep_merge, read_yaml, structure, unstructure
from puzzle_core.dtypes import ModelDtype
from puzzle_core.errors import ConfigError
from puzzle_core.scenario import Scenario, at_least, device_name
from puzzle_core.search import Constraint, LayerRule, Objective


def _choice(type_, name: str, **options):
    """A default plugin choice, structured lazily so defaults need no registry at import."""
    return attrs.Factory(lambda: structure({"name": name, **options}, type_))


@attrs.frozen
class ParentSection:
    """The model to compress."""

    source: str = "smollm2-135m"  # an embedded alias, a local HF folder or a .gguf file
    architecture: ArchitectureChoice | None = None  # None: detected from the parent's config
    dtype: ModelDtype = "fp32"
    trust_remote_code: bool = False  # only ever set when the user asks


@attrs.frozen
class DataSection:
    """Where training, validation and test text comes from."""

    # a corpus plugin ('demo': `puzzle data prepare`; 'synthetic': generated text, for tests), or a path (read by 'files')
    corpus: CorpusChoice = attrs.field(default="demo", converter=lambda value: corpus_choice(value, "$.data.corpus"))
    seq_len: int = 128
    validation_fraction: float = 0.05  # of the text, when the source does not give the splits itself
    test_fraction: float = 0.05


@attrs.frozen
class LibrarySection:
    """Stage 1: blockwise local distillation (BLD) of every alternative block.

    Decoupled BLD trains each attention and FFN variant on its own; coupled BLD trains
    (attention, FFN) pairs together, over every pair of the variants offered or only over
    a subspace: ``subspace`` (per layer, the block or sub-block ids to combine) or
    ``subspace_solutions`` (a decoupled search's ``solutions/index.json`` or one solution
    file: the variants its solutions chose, per layer).

    A job trains up to ``units_per_pass`` of a layer's units (0: all) in one pass over its
    activations; the blocks are the same for any value, only the work per job changes
    (1 spreads a layer's variants over workers, e.g. when there are more workers than layers).
    """

    variants: BlockVariantsChoice | None = None  # None: the architecture's default provider
    mode: Literal["decoupled", "coupled"] = "decoupled"
    tokens: int = attrs.field(default=16384, validator=attrs.validators.ge(1))  # training tokens per block
    heldout_tokens: int = attrs.field(default=2048, validator=attrs.validators.ge(0))  # validation tokens for held-out loss
    calibration_tokens: int = attrs.field(default=4096, validator=attrs.validators.ge(0))  # for init from the parent
    seq_len: int | None = None  # None: data.seq_len
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))  # sequences per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = attrs.field(default=0.05, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    bf16: bool = False  # bfloat16 autocast for the sub-blocks' forward passes (weights and optimizer stay float32)
    units_per_pass: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # per job; 0: all of a layer's
    activation_dtype: ModelDtype = "bf16"
    shard_tokens: int = attrs.field(default=8192, validator=attrs.validators.ge(1))  # tokens per activation file
    keep_activations: bool = True  # False: delete activations/ once every block is trained
    device: str = attrs.field(default="auto", validator=device_name)  # auto: a CUDA device per process if any, else cpu
    subspace: list[list[str]] | None = None
    subspace_solutions: str | None = None
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
    # Under torchrun: 'jobs' shares the layers' jobs out (each process holds the whole parent); 'layers' splits the
    # parent's layers over the processes, pipeline style (puzzle_core.scoring_pipeline): each holds its own layers
    sharding: Literal["jobs", "layers"] = "jobs"


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

    ``fit_memory`` bounds weights + KV cache at the scenario's batch by the memory of the
    cost model's device (``stats.memory_mib`` <= ``costs.memory_check.capacity_mib``), as
    the paper does. ``largest_batch`` names a cost model of a GPU (``h100``): for the parent
    and every solution, the largest batch whose weights + KV cache fit that GPU and the
    throughput there go into ``solutions/index.json``.
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
    fit_memory: bool = False
    largest_batch: CostModelChoice | None = None


@attrs.frozen
class WeightedLoss:
    """One term of the GKD loss: a distillation-loss plugin and its weight.

    In YAML a term is the plugin's name or ``{name: cosine, weight: 0.5, <options>}``;
    ``weight`` is ours, every other key goes to the plugin's options.
    """

    loss: DistillationLossChoice
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.loss.name


def _structure_weighted_loss(value, _type) -> WeightedLoss:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"expected a loss name or a mapping with 'name' and 'weight', got {value!r}")
    raw = dict(value)
    weight = CONVERTER.structure(raw.pop("weight", 1.0), float)
    if not (weight >= 0.0 and weight != float("inf")):
        raise ValueError(f"a loss weight must be a finite number >= 0, got {weight!r}")
    return WeightedLoss(loss=CONVERTER.structure(raw, DistillationLossChoice), weight=weight)


def _unstructure_weighted_loss(term: WeightedLoss) -> dict:
    return {**CONVERTER.unstructure(term.loss), "weight": term.weight}


CONVERTER.register_structure_hook(WeightedLoss, _structure_weighted_loss)
CONVERTER.register_unstructure_hook(WeightedLoss, _unstructure_weighted_loss)


def _default_gkd_losses() -> list[WeightedLoss]:
    """The paper's GKD objective: cosine on every layer's hidden states + KL on logits."""
    return [structure("cosine", WeightedLoss), structure("kl", WeightedLoss)]


_fraction = attrs.validators.and_(attrs.validators.ge(0.0), attrs.validators.le(1.0))


@attrs.frozen
class GKDSection:
    """Stage 3: global knowledge distillation (uptraining) of the assembled children.

    ``batch_size`` x ``seq_len`` x ``grad_accum`` x processes tokens make one optimizer
    step; ``tokens`` / that is the number of steps. Children close to the parent need a
    small ``lr`` (or a large step): Adam's first updates are noise-sized for every weight.

    Under torchrun the processes train each child together: ``sharding: ddp`` gives every
    process the whole child and parent; ``fsdp`` (FSDP2) gives each 1/N of the child's and
    the parent's weights, gradients and optimizer state (bf16 parameters on GPU when
    ``bf16``), with sharded checkpoints, one safetensors file per process, and the child
    gathered into one checkpoint at the end. ``activation_checkpointing`` recomputes each
    layer in the backward pass instead of keeping its activations.
    """

    enabled: bool = True
    children: Literal["all", "main"] = "all"  # 'main': only the first child of children/index.json
    # the text distilled on, like data.corpus (e.g. {name: mix, corpora: [demo, knowledge]}); None: data.corpus.
    # KL to the parent in the evaluation is on evaluation.corpus's test split.
    corpus: CorpusChoice | None = attrs.field(default=None, converter=attrs.converters.optional(
        lambda value: corpus_choice(value, "$.gkd.corpus")))
    tokens: int = attrs.field(default=65536, validator=at_least(1))  # training tokens per child, all processes
    seq_len: int | None = attrs.field(default=None, validator=attrs.validators.optional(at_least(2)))  # None: data.seq_len
    batch_size: int = attrs.field(default=8, validator=at_least(1))  # sequences per micro-batch and process
    grad_accum: int = attrs.field(default=1, validator=at_least(1))  # micro-batches per optimizer step
    lr: float = attrs.field(default=1e-4, validator=attrs.validators.gt(0.0))
    min_lr_fraction: float = attrs.field(default=0.1, validator=_fraction)  # cosine decay ends at lr * this
    warmup_fraction: float = attrs.field(default=0.05, validator=_fraction)
    weight_decay: float = attrs.field(default=0.0, validator=at_least(0.0))
    max_grad_norm: float = attrs.field(default=1.0, validator=at_least(0.0))  # 0: no clipping
    bf16: bool = False  # bfloat16 autocast for the forward passes
    # What trains: 'all' parameters; 'layers' (embeddings, final norm and LM head frozen); 'changed': the
    # sub-blocks that differ from the parent's, plus every sub-block of the layers within `trainable_neighbors`
    trainable: Literal["all", "layers", "changed"] = "all"
    trainable_neighbors: int = attrs.field(default=1, validator=at_least(0))
    device: str = attrs.field(default="auto", validator=device_name)  # 'auto': the local rank's GPU if any, else CPU
    sharding: Literal["ddp", "fsdp"] = "ddp"  # how torchrun processes share one child's training
    activation_checkpointing: bool = False
    lora_rank: int = attrs.field(default=0, validator=at_least(0))  # 0: full fine-tuning; >0: LoRA, merged at the end
    lora_alpha: float | None = None  # None: 2 * lora_rank
    validation_tokens: int = attrs.field(default=2048, validator=at_least(1))  # validation tokens for the KL curve
    validate_every: int = attrs.field(default=0, validator=at_least(0))  # steps between validations; 0: at checkpoints
    checkpoint_every: int = attrs.field(default=50, validator=at_least(1))  # steps between resumable checkpoints
    losses: list[WeightedLoss] = attrs.Factory(_default_gkd_losses)
    executor: ExecutorChoice = _choice(ExecutorChoice, "local")


@attrs.frozen
class EvaluationSection:
    """Stage 4: measuring the parent and the children."""

    evaluators: list[EvaluatorChoice] = attrs.Factory(list)
    # the text whose test split evaluators measure on (KL to the parent, held-out perplexity), like data.corpus;
    # None: data.corpus. Pin it to compare runs that search or distil on different text.
    corpus: CorpusChoice | None = attrs.field(default=None, metadata=OMITTED_WHILE_UNSET, converter=attrs.converters.optional(
        lambda value: corpus_choice(value, "$.evaluation.corpus")))


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

    @property
    def distillation_corpus(self) -> CorpusChoice:
        """The text GKD distils on: ``gkd.corpus``, else ``data.corpus``."""
        return self.gkd.corpus if self.gkd.corpus is not None else self.data.corpus

    @property
    def evaluation_corpus(self) -> CorpusChoice:
        """The text the evaluation measures on: ``evaluation.corpus``, else ``data.corpus``."""
        return self.evaluation.corpus if self.evaluation.corpus is not None else self.data.corpus


def read_config_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, with its ``base`` (another config, relative to this file) merged under it.

    ``base: demo.yaml`` starts from that config; this file's sections then merge into it key
    by key (lists and values replace), so a variant config says only what differs.
    """
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([f"at $: expected a mapping of sections, got {type(data).__name__}"], str(path))
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError([f"at $.base: expected the path of another config, got {type(base).__name__}"], str(path))
    target = (path.parent / base).resolve()
    if target in _seen or target == path.resolve():
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve(), target))
        raise ConfigError([f"at $.base: configs name each other as base in a cycle: {chain}"], str(path))
    if not target.is_file():
        raise ConfigError([f"at $.base: '{base}' (resolved to {target}) does not exist; "
                           f"name a config file relative to {path.name}"], str(path))
    return deep_merge(read_config_data(target, (*_seen, path.resolve())), data)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PuzzleConfig:
    """Read and validate a run config (with its ``base``), with ``PATH=VALUE`` overrides; all problems at once."""
    data = read_config_data(path)
    config = structure(data, PuzzleConfig, source=str(path))
    if not overrides:
        return config
    source = f"{path} with --set {' --set '.join(overrides)}"
    return structure(apply_overrides(unstructure(config), overrides, source), PuzzleConfig, source=source)


def environment_problems(config: PuzzleConfig, registries) -> list[str]:
    """Devices and executors the config asks for that this machine lacks (CUDA, NCCL)."""
    import torch

    problems = []
    for path, setting in (("library.device", config.library.device), ("gkd.device", config.gkd.device)):
        if not setting.startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            problems.append(f"at $.{path}: '{setting}' asks for a CUDA GPU, but torch sees none on this machine "
                            f"(torch {torch.__version__}). Use auto (a GPU when there is one, else the CPU) or cpu.")
        elif setting.startswith("cuda:") and int(setting[5:]) >= torch.cuda.device_count():
            problems.append(f"at $.{path}: '{setting}' names a GPU this machine does not have (it has "
                            f"{torch.cuda.device_count()}: cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    for path, choice in (("library.executor", config.library.executor), ("scoring.executor", config.scoring.executor),
                         ("gkd.executor", config.gkd.executor)):
        executor = registries.record(choice).create(choice.options)
        problems += [f"at $.{path}: executor '{choice.name}' cannot run here: {problem}"
                     for problem in executor.check_environment()]
    return problems


def check_config(config: PuzzleConfig, registries=None, source: str | None = None) -> None:
    """What structure alone cannot see: whether the chosen plugins can work together on this scenario and machine.

    A cost model whose spec sheet lacks the scenario's dtype, for instance, would fail at
    the cost stage after BLD and scoring ran; here it is a :class:`ConfigError` up front.
    """
    from puzzle_core.registry import get_registries

    registries = registries or get_registries()
    choice = config.costs.model
    cost_model = registries.record(choice).create(choice.options)
    problems = [
        f"at $.costs.model: cost model '{choice.name}' cannot price this scenario: {problem}"
        for problem in cost_model.check_scenario(config.scenario)
    ]
    problems += environment_problems(config, registries)
    fitting = config.search.largest_batch
    if fitting is not None:
        gpu = registries.record(fitting).create(fitting.options)
        problems += [
            f"at $.search.largest_batch: cost model '{fitting.name}' cannot price this scenario: {problem}"
            for problem in gpu.check_scenario(config.scenario)
        ]
        if gpu.memory_capacity_mib(config.scenario) is None:
            problems.append(f"at $.search.largest_batch: cost model '{fitting.name}' does not know its device's memory, "
                            f"so no batch can be said to fit; name a cost model of a GPU (e.g. h100)")
    if problems:
        raise ConfigError(problems, source)
