"""Replace-1-block scoring: the quality of one block, put alone into the parent.

Scoring every (layer, block) naively costs a full forward per block. Instead the parent
runs over the scoring data once and the engine keeps, per group of sequences, the hidden
state entering every layer plus the parent's final hidden states (and log-probs when a
scorer compares with them). A block at layer ``i`` then starts from the cached state
entering layer ``i`` and runs only itself, layers ``i+1..N-1`` and the head: the compute
floor of replace-1-block scoring. What else the engine does to stay near it:

- Batches of equal shape (and no per-row extras) are merged into groups of up to
  ``group_tokens`` tokens, so every layer runs as few, large matrix products.
- The parent's own block is not run again: its scores are the parent's reference values.
- KL and LM loss never materialise the child's ``tokens x vocab`` logits or log-probs:
  :func:`head_statistics` streams the LM head in vocabulary slices of a few MiB (when the
  runner exposes :meth:`~puzzle_core.interfaces.LayerRunner.head_projection`; else in
  row chunks), keeping per token only a running log-normaliser ``logsumexp(z)``, the
  parent-weighted logit sum ``sum_v p_v z_v`` and the label's logit:
  ``KL(p || q) = sum_v p_v log p_v - sum_v p_v z_v + m logsumexp(z)``, where the
  parent's negative entropy and mass ``m = sum_v p_v`` are cached per token (``m`` is 1
  up to float32 rounding, which times a log-normaliser of ~30 would otherwise cost
  ~1e-4 nats). Per-token sums are accumulated in float64. Scorers reach these through
  :func:`kl_per_token` and :func:`label_log_probs`; any other scorer still gets full
  ``log_probs`` on first use.

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
SLICE_ELEMENTS = 1 << 20  # logits per streamed block of the head (4 MiB in float32: stays in cache)
ROW_CHUNK = 64  # rows per block when the head can only be called whole


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


def merge_batches(batches: Sequence[ScoringBatch], group_tokens: int) -> list[ScoringBatch]:
    """Consecutive batches of one sequence length and no per-row ``extra`` joined into groups of <= ``group_tokens``.

    Scorers return sums and counts, so a group scores exactly what its batches would.
    """
    merged: list[list[ScoringBatch]] = []
    for batch in batches:
        last = merged[-1] if merged else None
        if (last is not None and batch.extra is None and last[0].extra is None
                and batch.input_ids.shape[1:] == last[0].input_ids.shape[1:]
                and (batch.labels is None) == (last[0].labels is None)
                and sum(b.input_ids.numel() for b in last) + batch.input_ids.numel() <= group_tokens):
            last.append(batch)
        else:
            merged.append([batch])
    return [group[0] if len(group) == 1 else ScoringBatch(
        input_ids=torch.cat([b.input_ids for b in group]),
        mask=torch.cat([b.mask for b in group]),
        labels=None if group[0].labels is None else torch.cat([b.labels for b in group]),
    ) for group in merged]


# ---------------------------------------------------------------- the streamed head


@attrs.frozen
class TokenStatistics:
    """Per-token reductions of a model's logits ``z`` over the vocabulary (float64, one value per token)."""

    log_normalizer: torch.Tensor  # logsumexp_v z_v
    parent_dot: torch.Tensor | None  # sum_v p_v z_v, p the parent's next-token distribution
    label_logit: torch.Tensor | None  # z at the label (0 where the label is -100)


def _logit_blocks(runner: LayerRunner, rows: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """``(rows, vocabulary columns, float32 logits)`` blocks covering every logit once, a few MiB each."""
    projection = runner.head_projection()
    if projection is None:
        for start in range(0, len(rows), ROW_CHUNK):
            logits = runner.head(rows[start:start + ROW_CHUNK]).float()
            yield slice(start, start + len(logits)), slice(0, logits.shape[-1]), logits
        return
    pre, weight = projection
    normed = pre(rows)
    step = max(256, SLICE_ELEMENTS // max(len(rows), 1))
    for start in range(0, weight.shape[0], step):
        yield slice(0, len(rows)), slice(start, start + step), (normed @ weight[start:start + step].T).float()


def head_statistics(hidden: torch.Tensor, runner: LayerRunner, parent_log_probs: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> TokenStatistics:
    """:class:`TokenStatistics` of ``runner.head(hidden)`` in one streamed pass (see the module docstring).

    ``hidden``: ``(..., hidden)``; ``parent_log_probs``: ``(..., vocab)``; ``labels``: ``(...)`` ids or -100.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    count = len(rows)
    parent = None if parent_log_probs is None else parent_log_probs.reshape(count, -1)
    targets = None if labels is None else labels.reshape(count)
    maximum = torch.full((count,), -torch.inf, device=rows.device)
    total = torch.zeros(count, dtype=torch.float64, device=rows.device)
    dot = None if parent is None else torch.zeros_like(total)
    label_logit = None if targets is None else torch.zeros_like(total)
    for row, column, logits in _logit_blocks(runner, rows):
        top = torch.maximum(maximum[row], logits.amax(-1))
        rescale = torch.exp(maximum[row] - top).double()
        total[row] = total[row] * rescale + torch.exp(logits - top[:, None]).sum(-1).double()
        maximum[row] = top
        if dot is not None:
            dot[row] += (parent[row, column].exp() * logits).sum(-1).double()
        if label_logit is not None:
            local = targets[row] - column.start
            hit = (targets[row] >= 0) & (local >= 0) & (local < logits.shape[-1])
            label_logit[row][hit] = logits[hit, local[hit]].double()
    shape = hidden.shape[:-1]
    return TokenStatistics(
        log_normalizer=(maximum.double() + total.log()).reshape(shape),
        parent_dot=None if dot is None else dot.reshape(shape),
        label_logit=None if label_logit is None else label_logit.reshape(shape),
    )


class StreamedOutputs(ModelOutputs):
    """Final hidden states as the engine hands them to scorers: full log-probs on first use (as any
    :class:`ModelOutputs`), and :class:`TokenStatistics` against ``parent`` from one streamed head pass."""

    def __init__(self, hidden, runner: LayerRunner, parent: "StreamedOutputs | None" = None, labels=None,
                 log_probs=None):
        super().__init__(hidden, runner.head, log_probs)
        self.runner = runner
        self.parent = parent
        self.labels = labels
        self.neg_entropy: torch.Tensor | None = None  # sum_v p_v log p_v per token, when these are a parent's
        self.mass: torch.Tensor | None = None  # sum_v p_v per token (1 up to rounding), when these are a parent's
        self._statistics: TokenStatistics | None = None

    def statistics(self) -> TokenStatistics:
        if self._statistics is None:
            parent = self.parent._log_probs if self.parent is not None else None
            self._statistics = head_statistics(self.hidden, self.runner, parent, self.labels)
        return self._statistics


def _entropy_terms(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_v p_v log p_v`` and ``sum_v p_v`` per token, in row chunks (no second full-size tensor)."""
    rows = log_probs.reshape(-1, log_probs.shape[-1])
    neg_entropy, mass = [], []
    for chunk in rows.split(ROW_CHUNK):
        probs = chunk.exp()
        neg_entropy.append((probs * chunk).sum(-1).double())
        mass.append(probs.sum(-1).double())
    return torch.cat(neg_entropy).reshape(log_probs.shape[:-1]), torch.cat(mass).reshape(log_probs.shape[:-1])


def kl_per_token(child: ModelOutputs, parent: ModelOutputs) -> torch.Tensor:
    """KL(parent || child) of the next-token distributions, per token ``(batch, seq)``."""
    streamed = isinstance(child, StreamedOutputs) and child.parent is parent
    if streamed and getattr(parent, "neg_entropy", None) is not None:
        statistics = child.statistics()
        return parent.neg_entropy - statistics.parent_dot + parent.mass * statistics.log_normalizer
    # sum_v p (log p - log q), written out: ~40% faster than F.kl_div on a 49k vocabulary, same terms
    return (parent.log_probs.exp() * (parent.log_probs - child.log_probs)).sum(-1)


def label_log_probs(child: ModelOutputs, labels: torch.Tensor) -> torch.Tensor:
    """``log q(label)`` per token ``(batch, seq)``; 0 where the label is -100."""
    if isinstance(child, StreamedOutputs) and child.labels is labels:
        statistics = child.statistics()
        value = statistics.label_logit - statistics.log_normalizer
    else:
        value = child.log_probs.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return value.where(labels != -100, torch.zeros_like(value))


# ---------------------------------------------------------------- the engine


def parent_outputs(hidden: torch.Tensor, runner: LayerRunner, batch: ScoringBatch, references: Mapping[str, Scorer],
                   totals: dict[str, list[float]], keep_log_probs: bool) -> StreamedOutputs:
    """The parent's outputs on ``batch`` from its last hidden states, kept for every block's scores; each
    reference scorer's parent-vs-parent value is added to ``totals`` (value, count)."""
    outputs = StreamedOutputs(hidden, runner, labels=batch.labels)
    for name, scorer in references.items():
        value, count = scorer.batch_score(outputs, outputs, batch)
        totals[name][0] += value
        totals[name][1] += count
    parent = StreamedOutputs(hidden, runner, labels=batch.labels, log_probs=outputs.log_probs if keep_log_probs else None)
    if keep_log_probs:
        parent.neg_entropy, parent.mass = _entropy_terms(parent.log_probs)
    return parent


class ReplaceOneBlockEngine:
    """The parent's run over fixed data, cached so that a block at layer ``i`` costs itself, layers ``i+1..N-1``
    and the head."""

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
        group_tokens: int = 2048,
    ):
        self.runner = runner
        self.batches = [to_device(batch, device) for batch in merge_batches(batches, group_tokens)]
        self.keep_log_probs = keep_log_probs
        self.vocab_size = vocab_size
        self.max_cache_mib = max_cache_mib
        self.entering: list[list[torch.Tensor]] = []  # [group][layer]: hidden state entering the layer
        self.contexts: list[Any] = []
        self.parent: list[StreamedOutputs] = []
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
        for index, batch in enumerate(tqdm(self.batches, desc="caching parent activations", unit="group",
                                           disable=not progress, leave=False)):
            hidden = self.runner.embed(batch.input_ids)
            if index == 0:
                self._check_size(hidden)
            context = self.runner.context(hidden)
            entering = []
            for layer in range(self.num_layers):
                entering.append(hidden)
                hidden = self.runner.layer(layer, hidden, context)
            self.entering.append(entering)
            self.contexts.append(context)
            self.parent.append(parent_outputs(hidden, self.runner, batch, references, totals, self.keep_log_probs))
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

    def is_parent_block(self, layer: int, attention, ffn) -> bool:
        return attention is self.runner.sublayer(layer, "attention") and ffn is self.runner.sublayer(layer, "ffn")

    def outputs(self, layer: int, attention, ffn, *, reuse_prefix: bool = True
                ) -> Iterator[tuple[ScoringBatch, StreamedOutputs, StreamedOutputs]]:
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
                yield batch, StreamedOutputs(hidden, self.runner, parent, batch.labels), parent

    def score(self, layer: int, attention, ffn, scorers: Mapping[str, Scorer], *, reuse_prefix: bool = True
              ) -> dict[str, float]:
        """Every scorer's value for one block (sum of batch values over sum of counts).

        The parent's own block scores the parent's reference values without running
        (``reuse_prefix=False`` runs it anyway).
        """
        if reuse_prefix and self.is_parent_block(layer, attention, ffn) and set(scorers) <= set(self.reference):
            return {name: self.reference[name] for name in scorers}
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
