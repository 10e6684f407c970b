"""Replace-1-block scoring with the parent's layers split over the processes of a torch.distributed group.

Rank ``r`` of ``n`` owns a contiguous run of layers (:func:`layer_ranges`); rank 0 also
embeds, the last rank also runs the final norm and LM head and scores. The parent's pass
runs once, pipeline style: each rank keeps the hidden states entering its own layers and
sends what leaves them to the next rank; the last rank keeps the parent's outputs (and
log-probs when a scorer needs them). A block at layer ``i`` then starts on the rank that
owns ``i`` from its cached input, runs there and on every later rank, and is scored on
the last: the suffix runs where its layers live. Every rank calls :meth:`score` for the
same blocks in the same order; the block's modules are needed on the owner only.

A rank touches only its own layers (and the embeddings or head), so each needs only
those weights on its device: that is what lets a parent larger than one device be scored.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from puzzle_core.interfaces import LayerRunner, Scorer, ScoringBatch
from puzzle_core.scoring import StreamedOutputs, merge_batches, parent_outputs, to_device


def layer_ranges(num_layers: int, size: int) -> list[range]:
    """Contiguous, as equal as can be, runs of layers for ``size`` ranks (the first ones get the extra layers)."""
    if size > num_layers:
        raise ValueError(f"{size} processes cannot split {num_layers} layers: each needs at least one")
    base, extra = divmod(num_layers, size)
    bounds = [0]
    for rank in range(size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return [range(bounds[r], bounds[r + 1]) for r in range(size)]


class PipelineScoringEngine:
    """:class:`~puzzle_core.scoring.ReplaceOneBlockEngine` with the layers split over the ranks (see the module)."""

    def __init__(self, runner: LayerRunner, batches: Sequence[ScoringBatch], *, hidden_size: int, dtype: torch.dtype,
                 keep_log_probs: bool, references: Mapping[str, Scorer] | None = None,
                 device: str | torch.device = "cpu", group_tokens: int = 2048):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.runner = runner
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, torch.device(device)
        self.ranges = layer_ranges(runner.num_layers, self.size)
        self.own = self.ranges[self.rank]
        self.last = self.rank == self.size - 1
        self.batches = [to_device(batch, device) for batch in merge_batches(batches, group_tokens)]
        self.keep_log_probs = keep_log_probs
        self.entering: list[dict[int, torch.Tensor]] = []  # [group]{own layer: hidden state entering it}
        self.contexts: list[Any] = []
        self.parent: list[StreamedOutputs] = []  # the last rank's
        self.reference: dict[str, float] = {}  # the last rank's: each scorer on the parent itself
        self._build(references or {})

    def owner(self, layer: int) -> int:
        return next(rank for rank, layers in enumerate(self.ranges) if layer in layers)

    def _receive(self, batch: ScoringBatch) -> torch.Tensor:
        hidden = torch.empty(*batch.input_ids.shape, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(hidden, self.rank - 1)
        return hidden

    def _pass(self, index: int, hidden: torch.Tensor, layers: range) -> torch.Tensor:
        """Run ``layers`` (this rank's) on a group's hidden states; send the result on unless this rank is last."""
        for layer in layers:
            hidden = self.runner.layer(layer, hidden, self.contexts[index])
        if not self.last:
            dist.send(hidden.contiguous(), self.rank + 1)
        return hidden

    @torch.no_grad()
    def _build(self, references: Mapping[str, Scorer]) -> None:
        totals = {name: [0.0, 0.0] for name in references}
        for index, batch in enumerate(self.batches):
            hidden = self.runner.embed(batch.input_ids).to(self.dtype) if self.rank == 0 else self._receive(batch)
            self.contexts.append(self.runner.context(hidden))
            entering = {}
            for layer in self.own:
                entering[layer] = hidden
                hidden = self.runner.layer(layer, hidden, self.contexts[index])
            self.entering.append(entering)
            if not self.last:
                dist.send(hidden.contiguous(), self.rank + 1)
                continue
            self.parent.append(parent_outputs(hidden, self.runner, batch, references, totals, self.keep_log_probs))
        if self.last:
            self.reference = {name: value / max(count, 1e-30) for name, (value, count) in totals.items()}

    @torch.no_grad()
    def score(self, layer: int, attention, ffn, scorers: Mapping[str, Scorer]) -> dict[str, float] | None:
        """Every scorer's value for one block at ``layer``, on the last rank (``None`` on the others).

        ``attention`` and ``ffn`` are the block's sub-block modules on the rank that owns
        ``layer`` and may be ``None`` elsewhere; ranks before the owner return at once.
        """
        owner = self.owner(layer)
        if self.rank < owner:
            return None
        totals = {name: [0.0, 0.0] for name in scorers}
        for index, batch in enumerate(self.batches):
            if self.rank == owner:
                context = self.contexts[index]
                hidden = self.entering[index][layer]
                hidden = hidden + attention(hidden, context)
                hidden = hidden + ffn(hidden, context)
                hidden = self._pass(index, hidden, range(layer + 1, self.own.stop))
            else:
                hidden = self._pass(index, self._receive(batch), self.own)
            if self.last:
                child = StreamedOutputs(hidden, self.runner, self.parent[index], batch.labels)
                for name, scorer in scorers.items():
                    value, count = scorer.batch_score(child, self.parent[index], batch)
                    totals[name][0] += float(value)
                    totals[name][1] += float(count)
        if not self.last:
            return None
        return {name: value / max(count, 1e-30) for name, (value, count) in totals.items()}
