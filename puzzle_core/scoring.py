"""Replace-1-block scoring: the quality of one block, put alone into the parent.

Scoring every (layer, block) naively costs a full forward per block. Instead the parent
runs over the scoring data once and the engine keeps, per batch, the hidden state
entering every layer plus the parent's final hidden states (and log-probs when a
scorer compares with them). A block at layer ``i`` then starts from the cached state
entering layer ``i`` and runs only layers ``i..N-1`` and the head.

Memory bound (checked before caching, ``scoring.max_cache_mib``): ``tokens x hidden x
(layers + 1)`` activations in the parent's dtype, plus ``tokens x vocab`` float32
log-probs when kept. SmolLM2-135M at 4096 validation tokens: 4096 x 576 x 31 x 4 B =
279 MiB of hidden states + 4096 x 49152 x 4 B = 768 MiB of log-probs.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import attrs
import torch
from tqdm.auto import tqdm

from puzzle_core.errors import UserError
from puzzle_core.interfaces import LayerRunner, ModelOutputs, Scorer, ScoringBatch, ScoringData

MIB = 1 << 20


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction at each position (-100 where there is no next real token)."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if mask is not None:
        labels[:, :-1][~mask[:, 1:]] = -100
    return labels


def validation_data(ctx) -> ScoringData:
    """``scoring.tokens`` tokens of the run's validation split, in ``scoring.batch_size`` sequences per batch."""
    section, seq_len, seed = ctx.config.scoring, ctx.config.data.seq_len, ctx.config.seed

    def load() -> list[ScoringBatch]:
        batches = []
        for input_ids in ctx.corpus.batches("validation", seq_len, section.batch_size, section.tokens, seed):
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
            mask = torch.ones_like(input_ids, dtype=torch.bool)
            batches.append(ScoringBatch(input_ids=input_ids, mask=mask, labels=next_token_labels(input_ids)))
        if not batches:
            raise UserError(
                f"The validation split gave no batches of {seq_len} tokens for scoring. Lower data.seq_len, "
                f"raise data.validation_fraction, or use a larger corpus."
            )
        return batches

    return ScoringData(
        key=f"validation/seq{seq_len}/tokens{section.tokens}/batch{section.batch_size}/seed{seed}",
        load=load,
        description=f"{section.tokens} validation tokens in sequences of {seq_len}",
    )


def cache_mib(tokens: int, num_layers: int, hidden_size: int, vocab_size: int, itemsize: int, log_probs: bool) -> float:
    """Size of the engine's parent cache (see the module docstring)."""
    hidden = tokens * hidden_size * (num_layers + 1) * itemsize
    return (hidden + (tokens * vocab_size * 4 if log_probs else 0)) / MIB


def to_device(batch: ScoringBatch, device: str | torch.device) -> ScoringBatch:
    """The batch with its tensors on the model's device."""
    moved = {name: value.to(device) for name, value in attrs.asdict(batch, recurse=False).items()
             if isinstance(value, torch.Tensor)}
    return attrs.evolve(batch, **moved)


class ReplaceOneBlockEngine:
    """The parent's run over fixed data, cached so that a block at layer ``i`` costs layers ``i..N-1``."""

    def __init__(
        self,
        runner: LayerRunner,
        batches: Sequence[ScoringBatch],
        *,
        keep_log_probs: bool,
        vocab_size: int,
        max_cache_mib: float,
        references: Mapping[str, Scorer] | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ):
        self.runner = runner
        self.batches = [to_device(batch, device) for batch in batches]
        self.keep_log_probs = keep_log_probs
        self.vocab_size = vocab_size
        self.max_cache_mib = max_cache_mib
        self.entering: list[list[torch.Tensor]] = []  # [batch][layer]: hidden state entering the layer
        self.contexts: list[Any] = []
        self.parent: list[ModelOutputs] = []
        self.reference: dict[str, float] = {}  # each scorer on the parent itself
        self._build(references or {}, progress)

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    @property
    def tokens(self) -> int:
        return sum(int(b.input_ids.numel()) for b in self.batches)

    @torch.inference_mode()
    def _build(self, references: Mapping[str, Scorer], progress: bool) -> None:
        totals = {name: [0.0, 0.0] for name in references}
        for index, batch in enumerate(tqdm(self.batches, desc="caching parent activations", unit="batch",
                                           disable=not progress, leave=False)):
            hidden = self.runner.embed(batch.input_ids)
            if index == 0:
                self._check_size(hidden)
            context = self.runner.context(hidden)
            entering = []
            for layer in range(self.num_layers):
                entering.append(hidden)
                hidden = self.runner.layer(layer, hidden, context)
            outputs = ModelOutputs(hidden, self.runner.head)
            for name, scorer in references.items():
                value, count = scorer.batch_score(outputs, outputs, batch)
                totals[name][0] += value
                totals[name][1] += count
            log_probs = outputs.log_probs if self.keep_log_probs else None
            self.entering.append(entering)
            self.contexts.append(context)
            self.parent.append(ModelOutputs(hidden, self.runner.head, log_probs))
        self.reference = {name: value / max(count, 1e-30) for name, (value, count) in totals.items()}

    def _check_size(self, hidden: torch.Tensor) -> None:
        needed = cache_mib(self.tokens, self.num_layers, hidden.shape[-1], self.vocab_size,
                           hidden.element_size(), self.keep_log_probs)
        if needed > self.max_cache_mib:
            raise UserError(
                f"Replace-1-block scoring would cache {needed:.0f} MiB of parent activations for {self.tokens} "
                f"tokens, above scoring.max_cache_mib = {self.max_cache_mib:.0f}. Lower scoring.tokens (or the "
                f"scorer's question limit), or raise scoring.max_cache_mib if the memory is there."
            )

    def outputs(self, layer: int, attention, ffn, *, reuse_prefix: bool = True
                ) -> Iterator[tuple[ScoringBatch, ModelOutputs, ModelOutputs]]:
        """``(batch, child outputs, parent outputs)`` with ``layer``'s sub-blocks replaced.

        ``reuse_prefix=False`` recomputes layers ``0..layer-1`` from the embeddings (the
        naive way, for checking and benchmarking the cache).
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a {self.num_layers}-layer model")
        with torch.inference_mode():
            for batch, entering, context, parent in zip(self.batches, self.entering, self.contexts, self.parent):
                if reuse_prefix:
                    hidden = entering[layer]
                else:
                    hidden = self.runner.embed(batch.input_ids)
                    for earlier in range(layer):
                        hidden = self.runner.layer(earlier, hidden, context)
                hidden = hidden + attention(hidden, context)
                hidden = hidden + ffn(hidden, context)
                for later in range(layer + 1, self.num_layers):
                    hidden = self.runner.layer(later, hidden, context)
                yield batch, ModelOutputs(hidden, self.runner.head), parent

    def score(self, layer: int, attention, ffn, scorers: Mapping[str, Scorer], *, reuse_prefix: bool = True
              ) -> dict[str, float]:
        """Every scorer's value for one block (sum of batch values over sum of counts)."""
        totals = {name: [0.0, 0.0] for name in scorers}
        with torch.inference_mode():
            for batch, child, parent in self.outputs(layer, attention, ffn, reuse_prefix=reuse_prefix):
                for name, scorer in scorers.items():
                    value, count = scorer.batch_score(child, parent, batch)
                    totals[name][0] += float(value)
                    totals[name][1] += float(count)
        return {name: value / max(count, 1e-30) for name, (value, count) in totals.items()}


class ScoringSession:
    """All scorers of a run, grouped by their data; each group's engine is built on first use."""

    def __init__(self, runner: LayerRunner, vocab_size: int, scorers: Mapping[str, Scorer],
                 data: Mapping[str, ScoringData], max_cache_mib: float, device: str | torch.device = "cpu",
                 progress: bool = True):
        self.runner = runner
        self.device = device
        self.vocab_size = vocab_size
        self.max_cache_mib = max_cache_mib
        self.progress = progress
        self.groups: dict[str, tuple[ScoringData, dict[str, Scorer]]] = {}
        for name, scorer in scorers.items():
            source = data[name]
            self.groups.setdefault(source.key, (source, {}))[1][name] = scorer
        self._engines: dict[str, ReplaceOneBlockEngine] = {}

    def engine(self, key: str) -> ReplaceOneBlockEngine:
        if key not in self._engines:
            source, scorers = self.groups[key]
            self._engines[key] = ReplaceOneBlockEngine(
                self.runner,
                source.load(),
                keep_log_probs=any(s.needs_parent_log_probs for s in scorers.values()),
                vocab_size=self.vocab_size,
                max_cache_mib=self.max_cache_mib,
                references=scorers,
                device=self.device,
                progress=self.progress,
            )
        return self._engines[key]

    def score(self, layer: int, attention, ffn) -> dict[str, float]:
        """Every scorer's value for one block at ``layer``."""
        values: dict[str, float] = {}
        for key, (_, scorers) in self.groups.items():
            values.update(self.engine(key).score(layer, attention, ffn, scorers))
        return values

    def reference(self) -> dict[str, float]:
        """Every scorer's value on the parent itself."""
        values: dict[str, float] = {}
        for key in self.groups:
            values.update(self.engine(key).reference)
        return values
