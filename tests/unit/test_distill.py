"""Unit tests of the CBD feature-distillation loss (METHODS.md §7.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import CBDDistillLoss, feature_distillation


def test_feature_distillation_hand_computation() -> None:
    student = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # Row 0: orthogonal → 1 − 0 = 1; row 1: parallel → 1 − 1 = 0. Scale of either input is irrelevant.
    assert feature_distillation(student, teacher).item() == pytest.approx(0.5, abs=1e-6)
    # 60 degrees apart → 1 − 0.5.
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.5, math.sqrt(3) / 2]]) * 7.0
    assert feature_distillation(s, t).item() == pytest.approx(0.5, abs=1e-6)


def test_cbd_total_is_weighted_sum_of_parts() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=gen)
    target = torch.tensor([0, 2, 1, 2])
    f_s = torch.randn(4, 8, generator=gen)
    f_t = F.normalize(torch.randn(4, 8, generator=gen), dim=1)  # teachers hand over normalised features
    out = CBDDistillLoss()(logits, target, f_s, f_t)
    ce = F.cross_entropy(logits, target)
    cos = torch.stack([torch.dot(f_s[i] / f_s[i].norm(), f_t[i] / f_t[i].norm()) for i in range(4)])
    fd = (1 - cos).mean()
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert out["feature_distill"].item() == pytest.approx(fd.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((0.6 * ce + 0.4 * 100.0 * fd).item(), rel=1e-5)


def test_cbd_alpha_zero_is_ce_and_teacher_gets_no_gradient() -> None:
    logits = torch.randn(2, 3)
    target = torch.tensor([1, 0])
    f_s = torch.randn(2, 4, requires_grad=True)
    f_t = torch.randn(2, 4, requires_grad=True)
    out = CBDDistillLoss(alpha=0.0)(logits, target, f_s, f_t)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    CBDDistillLoss()(logits, target, f_s, f_t)["loss"].backward()
    assert f_s.grad is not None and f_t.grad is None


def test_shape_and_alpha_errors() -> None:
    with pytest.raises(ValueError, match="must match"):
        feature_distillation(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="alpha"):
        CBDDistillLoss(alpha=1.5)
