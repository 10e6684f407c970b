"""Replace-1-block scorers on the validation tokens: ``kl``, ``lm_loss``, ``cosine``.

Each compares the otherwise-parent model with one block replaced against the parent,
per real token, on the same cached validation batches (one forward per block serves
all three, and ``kl`` and ``lm_loss`` share one streamed pass over the LM head, see
:mod:`puzzle_core.scoring`). Lower is better for all of them.
"""

from __future__ import annotations

import torch.nn.functional as F

from puzzle_core.api import ModelOutputs, Scorer, ScorerPlugin, ScoringBatch, hookimpl, kl_per_token, label_log_probs


class KLDivergence(Scorer):
    """KL(parent || model) of the next-token distributions, averaged over tokens (the paper's default)."""

    needs_parent_log_probs = True

    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        per_token = kl_per_token(child, parent)
        return float(per_token[batch.mask].sum()), float(batch.mask.sum())


class NextTokenLoss(Scorer):
    """Cross-entropy of the model on the true next tokens (the parent's own loss for the parent block)."""

    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        labels = batch.labels
        return float(-label_log_probs(child, labels).sum()), float((labels != -100).sum())


class HiddenCosineDistance(Scorer):
    """1 - cosine similarity of the final-layer hidden states (before the final norm and head)."""

    def batch_score(self, child: ModelOutputs, parent: ModelOutputs, batch: ScoringBatch) -> tuple[float, float]:
        similarity = F.cosine_similarity(child.hidden.float(), parent.hidden.float(), dim=-1)
        distance = (1.0 - similarity).clamp_min(0.0)
        return float(distance[batch.mask].sum()), float(batch.mask.sum())


@hookimpl
def puzzle_scorers() -> list[ScorerPlugin]:
    return [
        ScorerPlugin(name="kl", implementation=KLDivergence,
                     description="KL(parent || model) per validation token, block replaced alone (paper default)"),
        ScorerPlugin(name="lm_loss", implementation=NextTokenLoss,
                     description="next-token loss on the validation tokens, block replaced alone"),
        ScorerPlugin(name="cosine", implementation=HiddenCosineDistance,
                     description="1 - cosine similarity of final hidden states to the parent's, block replaced alone"),
    ]

