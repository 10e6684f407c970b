"""What the component built from each kind of record must provide.

A record's ``implementation`` is called with its options and returns an object of
the matching interface below. The pipeline stages only talk to these interfaces, so
the core never knows which model family, solver or device it is working with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import attrs

from puzzle_core.blocks import BlockSpec, SubBlockSpec, VariantSpace

Part = Literal["attention", "ffn"]


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

    def with_blocks(self, blocks: Sequence[BlockSpec]) -> "ModelShape":
        return attrs.evolve(self, blocks=tuple(blocks))


def parameter_count(model: Any) -> int:
    """Parameters of a ``torch.nn.Module``, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


@attrs.define
class LoadedModel:
    """A causal LM (a ``torch.nn.Module`` with the Hugging Face call signature) and friends."""

    model: Any
    tokenizer: Any
    shape: ModelShape
    source: str = ""


@attrs.frozen
class Calibration:
    """What a sub-block sees on calibration data, for initialising variants from the parent.

    ``inputs``: the residual stream entering the sub-block, ``(tokens, hidden)``;
    ``outputs``: what the parent sub-block adds to it, same shape.
    """

    inputs: Any
    outputs: Any


class LayerRunner(ABC):
    """Runs a model one piece at a time (capture, BLD, replace-1-block scoring).

    A sub-block module maps ``(hidden, context)`` to the *delta* it adds to the residual
    stream (norm included), so a layer is ``h += attn(h, ctx); h += ffn(h, ctx)``.
    """

    num_layers: int

    @abstractmethod
    def embed(self, input_ids) -> Any:
        """Token ids ``(batch, seq)`` -> hidden states ``(batch, seq, hidden)``."""

    @abstractmethod
    def context(self, hidden, attention_mask=None) -> Any:
        """Per-batch extras the sub-blocks need (positions, rotary tables, masks)."""

    @abstractmethod
    def sublayer(self, layer: int, part: Part) -> Any:
        """The module of ``part`` in ``layer``."""

    @abstractmethod
    def head(self, hidden) -> Any:
        """Final norm + LM head: hidden states -> logits."""

    def head_projection(self) -> tuple[Callable[[Any], Any], Any] | None:
        """``(pre, weight)`` with ``head(h) == pre(h) @ weight.T``, or ``None`` when the head is not of that form.

        With it, scoring streams the vocabulary in slices that stay in cache instead of
        materialising a ``tokens x vocab`` logits tensor.
        """
        return None

    def layer(self, index: int, hidden, context) -> Any:
        """One whole layer."""
        hidden = hidden + self.sublayer(index, "attention")(hidden, context)
        return hidden + self.sublayer(index, "ffn")(hidden, context)


class ModelFamily(ABC):
    """Implementation of an :class:`~puzzle_core.records.Architecture` record."""

    default_variants: str = ""  # name of the BlockVariants record used when the config names none

    @abstractmethod
    def detect(self, hf_config: Mapping[str, Any]) -> bool:
        """Whether a Hugging Face ``config.json`` belongs to this family."""

    @abstractmethod
    def shape(self, hf_config: Mapping[str, Any]) -> ModelShape:
        """The shape of a parent (or published child) from its config alone."""

    @abstractmethod
    def load_parent(self, source: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
        """Load a parent from a local folder or a GGUF file (remote code only when the user allows it)."""

    def aliases(self) -> Mapping[str, Callable[[], Path]]:
        """Named parents this family offers: name -> function returning a local folder (made on first use)."""
        return {}

    @abstractmethod
    def init_sublayer(
        self, parent: LoadedModel, layer: int, spec: SubBlockSpec, calibration: Calibration | None, method: str
    ) -> Any:
        """A sub-block module for ``spec`` at ``layer``, initialised from the parent by ``method``."""

    @abstractmethod
    def build_child(
        self,
        parent: LoadedModel,
        blocks: Sequence[BlockSpec],
        sublayers: Mapping[tuple[int, Part], Mapping[str, Any]] | None = None,
    ) -> LoadedModel:
        """A child with ``blocks``; sub-block weights from ``sublayers`` (state dicts), else the parent."""

    @abstractmethod
    def random_model(self, shape: ModelShape, dtype: str = "float32") -> Any:
        """A randomly initialised model of ``shape`` (timing, tests)."""

    @abstractmethod
    def layer_runner(self, model: Any) -> LayerRunner:
        """A :class:`LayerRunner` over a parent or child model."""

    @abstractmethod
    def export(self, child: LoadedModel, out_dir: Path) -> None:
        """Write a checkpoint that plain transformers loads (``trust_remote_code=True``)."""

    @abstractmethod
    def load_child(self, path: Path, dtype: str = "float32") -> LoadedModel:
        """Load an exported (or published) child checkpoint."""


class VariantProvider(ABC):
    """Implementation of a :class:`~puzzle_core.records.BlockVariants` record."""

    init_method: str = "default"

    @abstractmethod
    def variants(self, shape: ModelShape, layer: int) -> VariantSpace:
        """The alternatives offered for ``layer`` (parent sub-blocks included)."""


class DistillationLoss(ABC):
    """Implementation of a :class:`~puzzle_core.records.DistillationLoss` record.

    ``target`` says which outputs it compares: ``"hidden"`` (per-layer hidden states or a
    sub-block's output) or ``"logits"``.
    """

    target: Literal["hidden", "logits"] = "hidden"

    @abstractmethod
    def __call__(self, student, teacher, labels=None) -> Any:
        """A scalar loss tensor."""


@attrs.frozen
class ScoringBatch:
    """One batch a scorer is evaluated on, right-padded.

    Under causal attention right padding never changes what real tokens see, so no
    attention mask is needed. ``mask`` marks real tokens; ``labels`` holds next-token
    targets (-100 where none); ``extra`` is whatever else the scorer needs per row.
    """

    input_ids: Any  # (batch, seq) token ids
    mask: Any  # (batch, seq) bool, True on real tokens
    labels: Any = None  # (batch, seq) next-token targets, -100 where none
    extra: Any = None


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

    def __init__(self, hidden, head: Callable[[Any], Any], log_probs=None):
        self.hidden = hidden  # (batch, seq, hidden), before the final norm and LM head
        self.head = head  # final norm + LM head, applicable to any subset of hidden states
        self._log_probs = log_probs

    @property
    def log_probs(self):
        """Next-token log-probabilities, float32 ``(batch, seq, vocab)``."""
        if self._log_probs is None:
            import torch

            self._log_probs = torch.log_softmax(self.head(self.hidden).float(), dim=-1)
        return self._log_probs


class Scorer(ABC):
    """Implementation of a :class:`~puzzle_core.records.Scorer` record.

    The replace-1-block engine runs the parent with one block replaced over
    :meth:`data` and hands every batch to :meth:`batch_score`; the block's score is the
    sum of the returned values over the sum of the returned counts. A scorer on the
    validation tokens is therefore one method.
    """

    higher_is_better: bool = False
    needs_parent_log_probs: bool = False  # keep the parent's log-probs in the cache

    def __init__(self, options: Any = None):
        self.options = options

    def data(self, ctx) -> ScoringData:
        """What to score on (default: the validation split of the run's corpus)."""
        from puzzle_core.scoring import validation_data

        return validation_data(ctx)

    @abstractmethod
    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        """``(sum of per-item values, number of items)`` on one batch."""

    def info(self) -> dict:
        """Facts recorded with the scores (e.g. which task subjects were used)."""
        return {}


class CostModel(ABC):
    """Implementation of a :class:`~puzzle_core.records.CostModel` record."""

    @abstractmethod
    def block_costs(self, shape: ModelShape, block: BlockSpec, scenario: Any, family: ModelFamily | None) -> dict:
        """``{"runtime_ms", "prefill_ms", "decode_ms", "memory_mib", "num_params", ...}`` of one block."""

    @abstractmethod
    def fixed_costs(self, shape: ModelShape, scenario: Any, family: ModelFamily | None) -> dict:
        """The same keys for what every child keeps (embedding, final norm, LM head)."""

    def memory_capacity_mib(self, scenario: Any) -> float | None:
        """Memory a whole child (fixed + blocks) must fit in on the target device; ``None``: unknown."""
        return None


class Solver(ABC):
    """Implementation of a :class:`~puzzle_core.records.Solver` record."""

    @abstractmethod
    def solve(self, problem: Any) -> list[Any]:
        """Solutions to a :class:`puzzle_core.search.SearchProblem`, best first."""


class Evaluator(ABC):
    """Implementation of an :class:`~puzzle_core.records.Evaluator` record."""

    # True when the numbers depend on the architecture alone, not the weights (e.g. timing
    # fixed-length decoding): a child after GKD then reuses its assembled twin's numbers.
    architecture_only: bool = False

    @abstractmethod
    def evaluate(self, model: LoadedModel, context: Any) -> dict[str, float]:
        """Named numbers for ``model`` (``context`` holds the parent, data and scenario)."""


@attrs.frozen
class Job:
    """One independent unit of work; ``cost`` balances work across workers."""

    id: str
    cost: float = 1.0
    payload: Any = None


class Executor(ABC):
    """Implementation of an :class:`~puzzle_core.records.Executor` record.

    ``work`` is called once per job and writes its own result to the run directory, so
    a Ray or Slurm executor only has to call it somewhere and wait. ``work`` skips a job
    whose result is already there, so calling it again for every job after remote
    workers finish is a cheap check. ``context`` (the stage's
    :class:`~puzzle_core.pipeline.RunContext`) is for executors that start workers of
    their own: they re-run ``context.stage`` of the same config in them.
    """

    @abstractmethod
    def run(
        self, jobs: Sequence[Job], work: Callable[[Job], None], description: str = "jobs", context: Any = None
    ) -> None:
        """Run every job; returns when all are done (or raises on the first failure)."""
