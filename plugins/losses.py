"""Distillation losses shared by blockwise local distillation (BLD) and global distillation (GKD).

Every loss maps ``(student, teacher, labels=None)`` to a scalar tensor and says through
``target`` whether it compares hidden states (a sub-block's output, or per-layer hidden
states) or logits. All of them compute in float32, whatever the inputs' dtype, so a
bf16 teacher does not make the loss itself coarse.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from puzzle_core.api import DistillationLoss, DistillationLossPlugin, UserError, hookimpl


def _pair(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    return student.float(), teacher.detach().float()


@attrs.frozen
class NormalizedMSEOptions:
    eps: float = 1e-12  # keeps an all-zero teacher (an untrained no-op) from dividing by zero


class NormalizedMSE(DistillationLoss):
    """``||s - t||^2 / ||t||^2`` over the whole batch: the BLD loss of the Puzzle paper.

    Normalising by the teacher's energy makes losses comparable across layers whose
    residual contributions differ by orders of magnitude.
    """

    target = "hidden"

    def __init__(self, options: NormalizedMSEOptions):
        self.eps = options.eps

    def __call__(self, student, teacher, labels=None):
        student, teacher = _pair(student, teacher)
        return (student - teacher).pow(2).sum() / (teacher.pow(2).sum() + self.eps)


class MSE(DistillationLoss):
    """Mean squared error per element."""

    target = "hidden"

    def __call__(self, student, teacher, labels=None):
        student, teacher = _pair(student, teacher)
        return F.mse_loss(student, teacher)


class Cosine(DistillationLoss):
    """``1 - cos(s, t)`` per token over the hidden dimension, averaged (the GKD hidden-state loss)."""

    target = "hidden"

    def __call__(self, student, teacher, labels=None):
        student, teacher = _pair(student, teacher)
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()


@attrs.frozen
class KLOptions:
    temperature: float = 1.0

    def __attrs_post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class KL(DistillationLoss):
    """``KL(teacher || student)`` of next-token distributions, averaged over tokens.

    With a temperature ``T`` both distributions are softened and the loss is scaled by
    ``T^2`` so gradient magnitudes stay comparable across temperatures.
    """

    target = "logits"

    def __init__(self, options: KLOptions):
        self.temperature = options.temperature

    def __call__(self, student, teacher, labels=None):
        student, teacher = _pair(student, teacher)
        t = self.temperature
        log_student = F.log_softmax(student / t, dim=-1).reshape(-1, student.shape[-1])
        log_teacher = F.log_softmax(teacher / t, dim=-1).reshape(-1, teacher.shape[-1])
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        return kl * t * t


@attrs.frozen
class LMLossOptions:
    ignore_index: int = -100


class LMLoss(DistillationLoss):
    """Next-token cross-entropy of the student against ``labels`` (the teacher is not used).

    ``labels`` are aligned with the inputs as in Hugging Face models: position ``i``
    predicts ``labels[i + 1]``; positions labelled ``ignore_index`` do not count.
    """

    target = "logits"

    def __init__(self, options: LMLossOptions):
        self.ignore_index = options.ignore_index

    def __call__(self, student, teacher=None, labels=None):
        if labels is None:
            raise UserError(
                "The 'lm_loss' distillation loss needs token labels, but none were given. Use it only where "
                "labels exist (global distillation), or pick 'kl' / 'cosine' instead."
            )
        logits = student[..., :-1, :].float()
        targets = labels[..., 1:].to(logits.device)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=self.ignore_index
        )


@hookimpl
def puzzle_distillation_losses() -> list[DistillationLossPlugin]:
    return [
        DistillationLossPlugin(
            name="normalized_mse",
            implementation=NormalizedMSE,
            options=NormalizedMSEOptions,
            description="||s-t||^2 / ||t||^2 on hidden states (BLD default)",
        ),
        DistillationLossPlugin(
            name="mse", implementation=MSE, description="mean squared error on hidden states"
        ),
        DistillationLossPlugin(
            name="cosine",
            implementation=Cosine,
            description="1 - cosine similarity of hidden states (GKD)",
        ),
        DistillationLossPlugin(
            name="kl", implementation=KL, options=KLOptions, description="KL(teacher || student) on logits (GKD)"
        ),
        DistillationLossPlugin(
            name="lm_loss",
            implementation=LMLoss,
            options=LMLossOptions,
            description="next-token cross-entropy against labels",
        ),
    ]
