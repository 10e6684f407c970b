"""What the component built from each kind of record must provide, and the types they share.

A record's ``implementation`` is called with its options and returns an object of
the matching interface below. The pipeline stages only talk to these interfaces, so
the core never knows which model family, solver or device it is working with. Plugins
import all of this from :mod:`puzzle_core.api`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generic, Literal, Mapping, Sequence, TypeVar

import attrs

from puzzle_core.blocks import BlockSpec, SubBlockSpec, VariantSpace
from puzzle_core.cache import cache_root
from puzzle_core.data import CorpusText, TokenizedCorpus
from puzzle_core.dtypes import ModelDtype
from puzzle_core.scenario import Scenario
from puzzle_core.search import SearchProblem, Solution

if TYPE_CHECKING:
    import click
    import torch
    from transformers import PreTrainedTokenizerBase

Part = Literal["attention", "ffn"]
HFConfig = Mapping[str, object]
"""A Hugging Face ``config.json``, as parsed JSON."""
Costs = dict[str, float | str]
"""A cost model's numbers for one block (``runtime_ms``, ``memory_mib``...), plus notes kept as strings."""
LayerContext = object
"""Whatever a family's sub-blocks need per batch (positions, rotary tables, masks); opaque to the core."""
Payload = TypeVar("Payload")


@attrs.frozen
class ModelShape:
    """Everything cost models need, readable from a config alone (no weights)."""

    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    blocks: tuple[BlockSpec, ...]  # per layer: the parent's blocks, or a child's

    def with_blocks(self, blocks: Sequence[BlockSpec]) -> ModelShape:
        """The same model with other blocks (a child's, or ``n`` copies of one for timing)."""
        return attrs.evolve(self, blocks=tuple(blocks))


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of a ``torch.nn.Module``, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


@attrs.define
class LoadedModel:
    """A causal LM (a ``torch.nn.Module`` with the Hugging Face call signature) and friends."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    shape: ModelShape
    source: str = ""


@attrs.frozen
class Calibration:
    """What a sub-block sees on calibration data, for initialising variants from the parent.

    ``inputs``: the residual stream entering the sub-block, ``(tokens, hidden)``;
    ``outputs``: what the parent sub-block adds to it, same shape.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor


class LayerRunner(ABC):
    """Runs a model one piece at a time (capture, BLD, replace-1-block scoring).

    A sub-block module maps ``(hidden, context)`` to the *delta* it adds to the residual
    stream (norm included), so a layer is ``h += attn(h, ctx); h += ffn(h, ctx)``.
    """

    num_layers: int

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, seq)`` -> hidden states ``(batch, seq, hidden)``."""

    @abstractmethod
    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LayerContext:
        """Per-batch extras the sub-blocks need (positions, rotary tables, masks)."""

    @abstractmethod
    def sublayer(self, layer: int, part: Part) -> torch.nn.Module:
        """The module of ``part`` in ``layer``."""

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden states -> logits."""

    def head_projection(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | None:
        """``(pre, weight)`` with ``head(h) == pre(h) @ weight.T``, or ``None`` when the head is not of that form.

        With it, scoring streams the vocabulary in slices that stay in cache instead of
        materialising a ``tokens x vocab`` logits tensor.
        """
        return None

    def layer(self, index: int, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """One whole layer."""
        hidden = hidden + self.sublayer(index, "attention")(hidden, context)
        return hidden + self.sublayer(index, "ffn")(hidden, context)


class ModelFamily(ABC):
    """Implementation of an :class:`~puzzle_core.records.ArchitecturePlugin` record.

    :meth:`aliases` is not inherited: a subclass of another family offers only the parents it
    names itself, so it never re-offers (and clashes over) its base's.
    """

    default_variants: str = ""  # name of the BlockVariantsPlugin record used when the config names none

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "aliases" not in vars(cls):
            cls.aliases = ModelFamily.aliases

    @abstractmethod
    def detect(self, hf_config: HFConfig) -> bool:
        """Whether a Hugging Face ``config.json`` belongs to this family: a parent's, or a child it exported.

        Two families claiming one model is an error unless the config names one
        (``parent.architecture``), so a family claims only what it can load faithfully.
        """

    @abstractmethod
    def shape(self, hf_config: HFConfig) -> ModelShape:
        """The shape of a parent (or published child) from its config alone."""

    @abstractmethod
    def load_parent(self, source: str, dtype: ModelDtype = "fp32", trust_remote_code: bool = False) -> LoadedModel:
        """Load a parent from a local folder or a GGUF file (remote code only when the user allows it)."""

    def load_parent_layers(
        self, source: str, layers: Sequence[int], dtype: ModelDtype = "fp32", trust_remote_code: bool = False,
        ends: bool = False,
    ) -> LoadedModel:
        """The parent with real weights for ``layers`` only (and, with ``ends``, the embeddings, final norm and LM
        head), for BLD once activations are captured and for scoring with the layers split over processes.

        Other parameters may stay on the meta device; the tokenizer is there, and the layer
        runner's :meth:`~LayerRunner.context` and :meth:`init_sublayer` on those layers must
        work (``layers`` may be empty: the tokenizer and config alone). The default loads the whole parent: a family overrides it so that a BLD
        worker holds one layer of a parent that does not fit its memory.
        """
        return self.load_parent(source, dtype, trust_remote_code)

    def aliases(self) -> Mapping[str, Callable[[], Path]]:
        """Named parents this family offers: name -> function returning a local folder (made on first use).

        Not inherited by subclasses (see the class docstring).
        """
        return {}

    @abstractmethod
    def init_sublayer(
        self, parent: LoadedModel, layer: int, spec: SubBlockSpec, calibration: Calibration | None, method: str
    ) -> torch.nn.Module:
        """A sub-block module for ``spec`` at ``layer``, initialised from the parent by ``method``."""

    @abstractmethod
    def build_child(
        self,
        parent: LoadedModel,
        blocks: Sequence[BlockSpec],
        sublayers: Mapping[tuple[int, Part], Mapping[str, torch.Tensor]] | None = None,
    ) -> LoadedModel:
        """A child with ``blocks``; sub-block weights from ``sublayers`` (state dicts), else the parent."""

    @abstractmethod
    def random_model(self, shape: ModelShape, dtype: ModelDtype = "fp32") -> torch.nn.Module:
        """A randomly initialised model of ``shape`` (timing, tests)."""

    @abstractmethod
    def layer_runner(self, model: torch.nn.Module) -> LayerRunner:
        """A :class:`LayerRunner` over a parent or child model."""

    @abstractmethod
    def export(self, child: LoadedModel, out_dir: Path) -> None:
        """Write a checkpoint that plain transformers loads (``trust_remote_code=True``)."""

    @abstractmethod
    def load_child(self, path: Path, dtype: ModelDtype = "fp32") -> LoadedModel:
        """Load an exported (or published) child checkpoint."""


class VariantProvider(ABC):
    """Implementation of a :class:`~puzzle_core.records.BlockVariantsPlugin` record."""

    init_method: str = "default"

    @abstractmethod
    def variants(self, shape: ModelShape, layer: int) -> VariantSpace:
        """The alternatives offered for ``layer`` (parent sub-blocks included)."""


class DistillationLoss(ABC):
    """Implementation of a :class:`~puzzle_core.records.DistillationLossPlugin` record.

    ``target`` says which outputs it compares: ``"hidden"`` (per-layer hidden states or a
    sub-block's output) or ``"logits"``.
    """

    target: Literal["hidden", "logits"] = "hidden"

    def __init__(self, options: object = None):
        self.options = options

    @abstractmethod
    def __call__(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A scalar loss tensor."""


@attrs.frozen
class ScoringBatch:
    """One batch a scorer is evaluated on, right-padded.

    Under causal attention right padding never changes what real tokens see, so no
    attention mask is needed. ``mask`` marks real tokens; ``labels`` holds next-token
    targets (-100 where none); ``extra`` is whatever else the scorer needs per row.
    """

    input_ids: torch.Tensor  # (batch, seq) token ids
    mask: torch.Tensor  # (batch, seq) bool, True on real tokens
    labels: torch.Tensor | None = None  # (batch, seq) next-token targets, -100 where none
    extra: object = None


@attrs.frozen
class ScoringData:
    """The data a scorer runs on; scorers giving the same ``key`` share one cached parent pass.

    ``load`` is called once per process that scores, and only if some block still needs scores.
    """

    key: str
    load: Callable[[], Sequence[ScoringBatch]]
    description: str = ""


class ModelOutputs:
    """A model's final-layer hidden states on a batch; logits and log-probs made on first use."""

    def __init__(
        self,
        hidden: torch.Tensor,
        head: Callable[[torch.Tensor], torch.Tensor],
        log_probs: torch.Tensor | None = None,
    ):
        self.hidden = hidden  # (batch, seq, hidden), before the final norm and LM head
        self.head = head  # final norm + LM head, applicable to any subset of hidden states
        self._log_probs = log_probs

    @property
    def log_probs(self) -> torch.Tensor:
        """Next-token log-probabilities, float32 ``(batch, seq, vocab)``."""
        if self._log_probs is None:
            import torch

            self._log_probs = torch.log_softmax(self.head(self.hidden).float(), dim=-1)
        return self._log_probs


@attrs.frozen
class ProcessRole:
    """Where this process stands in a run, as the executor that started it says.

    The *driver* holds the run-directory lock, writes the manifest and merges results;
    *workers* (torchrun ranks but the first, a cluster's tasks) run the same stage code,
    rebuild the same job lists and do their share. ``rank`` / ``world_size`` /
    ``local_rank`` place the process among those that share jobs (``local_rank`` picks
    its GPU).
    """

    is_driver: bool = True
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether several processes share this stage's work."""
        return self.world_size > 1


class StageContext(ABC):
    """What a plugin sees of the pipeline stage that calls it (a scorer's data, an executor's relaunch)."""

    stage: str | None  # the stage being run
    role: ProcessRole
    seed: int

    @property
    @abstractmethod
    def parent(self) -> LoadedModel:
        """The parent, loaded on first use."""

    @property
    @abstractmethod
    def corpus(self) -> TokenizedCorpus:
        """The run's tokenised train / validation / test splits, read on first use."""

    @abstractmethod
    def scoring_data(self) -> ScoringData:
        """The default scoring data: ``scoring.tokens`` validation tokens of the run's corpus."""

    @abstractmethod
    def worker_arguments(self) -> list[str]:
        """``puzzle`` arguments that re-run this stage of this run in another process.

        The run's resolved config is written into the run directory for them. A worker
        started with them does its share of every job list; the executor's
        :meth:`Executor.process_role` must tell it that it is not the driver.
        """


class Scorer(ABC):
    """Implementation of a :class:`~puzzle_core.records.ScorerPlugin` record.

    The replace-1-block engine runs the parent with one block replaced over
    :meth:`data` and hands every batch to :meth:`batch_score`; the block's score is the
    sum of the returned values over the sum of the returned counts. A scorer on the
    validation tokens is therefore one method.
    """

    higher_is_better: bool = False
    needs_parent_log_probs: bool = False  # keep the parent's log-probs in the cache

    def __init__(self, options: object = None):
        self.options = options

    def data(self, context: StageContext) -> ScoringData:
        """What to score on (default: the validation split of the run's corpus)."""
        return context.scoring_data()

    @abstractmethod
    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        """``(sum of per-item values, number of items)`` on one batch."""

    def info(self) -> dict[str, object]:
        """Facts recorded with the scores (e.g. which task subjects were used)."""
        return {}


class CostModel(ABC):
    """Implementation of a :class:`~puzzle_core.records.CostModelPlugin` record."""

    @abstractmethod
    def block_costs(self, shape: ModelShape, block: BlockSpec, scenario: Scenario, family: ModelFamily | None) -> Costs:
        """``{"runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "num_params", ...}`` of one block."""

    @abstractmethod
    def fixed_costs(self, shape: ModelShape, scenario: Scenario, family: ModelFamily | None) -> Costs:
        """The same keys for what every child keeps (embedding, final norm, LM head)."""

    def memory_capacity_mib(self, scenario: Scenario) -> float | None:
        """Memory a whole child (fixed + blocks) must fit in on the target device; ``None``: unknown."""
        return None

    def check_scenario(self, scenario: Scenario) -> list[str]:
        """Why this model cannot price ``scenario`` (e.g. a dtype its spec sheet lacks); empty when it can.

        ``puzzle config validate`` and ``puzzle run`` ask before any stage runs.
        """
        return []


class Solver(ABC):
    """Implementation of a :class:`~puzzle_core.records.SolverPlugin` record."""

    @abstractmethod
    def solve(self, problem: SearchProblem) -> list[Solution]:
        """Solutions to ``problem``, best first."""


@attrs.frozen
class EvalContext:
    """What evaluators get besides the model: the parent (reference for KL), the corpus, the scenario."""

    parent: LoadedModel | None = None
    corpus: TokenizedCorpus | None = None
    scenario: Scenario = attrs.Factory(Scenario)
    threads: int = 2
    seed: int = 0
    cache_dir: Path = attrs.Factory(lambda: cache_root() / "eval")  # scratch files evaluators may reuse
    items_dir: Path | None = None  # where this model's per-item scores go (write_task_items); None: nowhere

    def require_parent(self, evaluator: str) -> LoadedModel:
        """The parent, or an error naming ``evaluator`` that needs it."""
        if self.parent is None:
            raise ValueError(f"the {evaluator} evaluator needs the parent in its EvalContext")
        return self.parent

    def require_corpus(self, evaluator: str) -> TokenizedCorpus:
        """The corpus, or an error naming ``evaluator`` that needs it."""
        if self.corpus is None:
            raise ValueError(f"the {evaluator} evaluator needs a corpus in its EvalContext")
        return self.corpus


class Evaluator(ABC):
    """Implementation of an :class:`~puzzle_core.records.EvaluatorPlugin` record."""

    # True when the numbers depend on the architecture alone, not the weights (e.g. timing
    # fixed-length decoding): a child after GKD then reuses its assembled twin's numbers.
    architecture_only: bool = False

    @abstractmethod
    def evaluate(self, model: LoadedModel, context: EvalContext) -> dict[str, float]:
        """Named numbers for ``model`` (``context`` holds the parent, data and scenario)."""


class Corpus(ABC):
    """Implementation of a :class:`~puzzle_core.records.CorpusPlugin` record: text for BLD, scoring and GKD.

    The core chunks what :meth:`read` returns, carves the splits a corpus does not
    define out of ``train``, tokenises with the parent's tokenizer and caches the result
    by the text's fingerprint.
    """

    @abstractmethod
    def read(self, seed: int) -> CorpusText:
        """The documents, per split when the source defines them (else all under ``train``)."""

    def prepare(self, force: bool = False, echo: Callable[[str], None] = print) -> None:
        """Fetch or build what :meth:`read` needs, once (``puzzle data prepare``); nothing by default."""


class Command(ABC):
    """Implementation of a :class:`~puzzle_core.records.CommandPlugin` record: a ``puzzle`` sub-command.

    The command is a click command (or group) named after the record; a
    :class:`~puzzle_core.errors.UserError` it raises is printed as one paragraph with exit code 2.
    """

    def __init__(self, options: object = None):
        self.options = options

    @abstractmethod
    def click_command(self) -> click.Command:
        """The click command to attach under the record's name."""


@attrs.frozen
class Job(Generic[Payload]):
    """One independent unit of work; ``cost`` balances work across workers."""

    id: str
    cost: float = 1.0
    payload: Payload | None = None


class Executor(ABC):
    """Implementation of an :class:`~puzzle_core.records.ExecutorPlugin` record.

    ``work`` is called once per job and writes its own result to the run directory, so
    a Ray or Slurm executor only has to call it somewhere and wait. ``work`` skips a job
    whose result is already there, so calling it again for every job after remote
    workers finish is a cheap check. Executors that start workers of their own re-run
    the stage in them with :meth:`StageContext.worker_arguments`, and recognise those
    workers in :meth:`process_role`.
    """

    @abstractmethod
    def run(
        self,
        jobs: Sequence[Job[Payload]],
        work: Callable[[Job[Payload]], None],
        description: str = "jobs",
        context: StageContext | None = None,
    ) -> None:
        """Run every job; returns when all are done (or raises on the first failure)."""

    def process_role(self) -> ProcessRole | None:
        """This process's role when this executor's launcher started it (a torchrun rank, a cluster task).

        ``None`` when this process was not started by it. Only executors read launcher
        environment variables; the pipeline asks every registered executor once.
        """
        return None

    def check_environment(self) -> list[str]:
        """Why this executor cannot run on this machine (e.g. a communication backend it lacks); empty when it can.

        ``puzzle config validate`` and ``puzzle run`` ask before any stage runs.
        """
        return []
