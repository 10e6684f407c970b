"""The distillation losses: values against hand computations, gradients, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from puzzle_core.choices import DistillationLossChoice
from puzzle_core.config import structure
from puzzle_core.errors import ConfigError, UserError


def make(registries, name, **options):
    choice = structure({"name": name, **options}, DistillationLossChoice)
    return registries.record(choice).create(choice.options)


def test_all_losses_registered_with_targets(registries):
    expected = {"normalized_mse": "hidden", "mse": "hidden", "cosine": "hidden", "kl": "logits", "lm_loss": "logits"}
    assert {name: make(registries, name).target for name in expected} == expected


def test_normalized_mse_is_relative_error_energy(registries):
    loss = make(registries, "normalized_mse")
    teacher = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    student = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    assert loss(student, teacher).item() == pytest.approx((1.0 + 1.0) / 25.0)
    # invariant to scaling both by the same factor, unlike plain MSE
    assert loss(10 * student, 10 * teacher).item() == pytest.approx(loss(student, teacher).item())
    assert loss(teacher, teacher).item() == 0.0


def test_normalized_mse_computes_in_float32_for_bf16_inputs(registries):
    loss = make(registries, "normalized_mse")
    teacher = torch.randn(4, 8, dtype=torch.bfloat16)
    value = loss(teacher.float() * 1.01, teacher)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(1e-4, rel=1e-3)


def test_mse_and_cosine(registries):
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert make(registries, "mse")(student, teacher).item() == pytest.approx(((student - teacher) ** 2).mean().item())
    cosine = make(registries, "cosine")
    assert cosine(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)


def test_kl_matches_definition_and_temperature(registries):
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert make(registries, "kl")(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert make(registries, "kl")(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p_t = (teacher / t).softmax(-1)
    expected_t = (p_t * (p_t.log() - (student / t).log_softmax(-1))).sum(-1).mean() * t * t
    assert make(registries, "kl", temperature=t)(student, teacher).item() == pytest.approx(expected_t.item(), rel=1e-5)


def test_kl_rejects_bad_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        structure({"name": "kl", "temperature": 0}, DistillationLossChoice)


def test_lm_loss_shifts_labels_and_ignores(registries):
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert make(registries, "lm_loss")(logits, None, labels).item() == pytest.approx(expected.item())
    with pytest.raises(UserError, match="labels"):
        make(registries, "lm_loss")(logits, logits)


def test_losses_give_gradients_to_student_only(registries):
    for name in ("normalized_mse", "mse", "cosine", "kl"):
        student = torch.randn(3, 6, requires_grad=True)
        teacher = torch.randn(3, 6, requires_grad=True)
        value = make(registries, name)(student, teacher)
        value.backward()
        assert math.isfinite(value.item())
        assert student.grad is not None and student.grad.abs().sum() > 0, name
        assert teacher.grad is None, name


def test_shape_mismatch_is_an_error(registries):
    with pytest.raises(ValueError, match="shape"):
        make(registries, "normalized_mse")(torch.zeros(2, 3), torch.zeros(3, 2))


def test_chunked_kl_equals_the_full_computation_and_its_gradient(registries):
    """Chunks of 3 positions (uneven: 14 rows) against autograd through one full log-softmax."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=generator) * 3
    teacher = torch.randn(2, 7, 50, generator=generator) * 3
    for t in (1.0, 2.0):
        student = logits.clone().requires_grad_(True)
        loss = make(registries, "kl", temperature=t)
        loss.chunk_tokens = 3
        chunked = loss(student, teacher)
        (chunked * 0.5).backward()
        reference_student = logits.clone().requires_grad_(True)
        log_s = F.log_softmax(reference_student / t, -1).reshape(-1, 50)
        log_t = F.log_softmax(teacher / t, -1).reshape(-1, 50)
        reference = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t
        (reference * 0.5).backward()
        assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
        torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-5, atol=1e-7)


def test_kl_of_bf16_logits_gives_a_bf16_gradient(registries):
    student = torch.randn(4, 9, 30).to(torch.bfloat16).requires_grad_(True)
    value = make(registries, "kl")(student, torch.randn(4, 9, 30).to(torch.bfloat16))
    value.backward()
    assert value.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert torch.isfinite(student.grad.float()).all()
