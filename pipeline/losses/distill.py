"""Distillation losses: CBD feature distillation and DeiT-LT hard distillation.

DeiT-LT (Rangwani et al., CVPR 2024; val-iisc/DeiT-LT ``losses.DistillationLoss`` with ``distillation_type='hard'``,
METHODS.md §6.4): ``L = (1−α)·L_cls + α·L_dist`` with α = 0.5, where ``L_cls`` is the CLS head against the ground
truth (soft-target CE on Mixup/label-smoothed targets before DRW; plain CE on hard labels after it with
``no_mixup_drw``) and ``L_dist = CE(dist_logits, argmax teacher_logits, weight=w)``, ``w`` the class-balanced DRW
weights indexed by the teacher-predicted class (PyTorch's weighted mean: ÷ Σ of the targets' weights).

CBD:

Reference: Iscen et al., "Class-Balanced Distillation for Long-Tailed Visual Recognition", BMVC 2021, Eq. (3)-(4);
official google-research ``class_balanced_distillation/train.py`` (``compute_feat_distillation``) and
``configs/stage_two_cbd.py`` (METHODS.md §7.3).

``L = (1−α)·mean CE(z, y) + α·β·mean_i (1 − cos(f_s,i, f_t,i))`` with α = 0.4, β = 100. Both features are
L2-normalised inside (the official code normalises them again although they already are; harmless). With
several teachers ``teacher_features`` is the concatenation of each teacher's normalised feature, and the student
projection must have the matching width. Weight decay is left to the optimizer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def feature_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean cosine distance ``mean_i (1 − cos(s_i, t_i))`` after L2-normalising both.

    Args:
        student: Student features (B, D).
        teacher: Teacher features (B, D), treated as a constant target (detached).

    Returns:
        A scalar in [0, 2].
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must match")
    s = F.normalize(student, dim=1)  # (B, D)
    t = F.normalize(teacher.detach().to(student.dtype), dim=1)
    return (1.0 - (s * t).sum(dim=1)).mean()


class CBDDistillLoss(nn.Module):
    """CBD stage-2 loss: weighted CE plus feature distillation.

    Args:
        alpha: Mixing weight α between CE (1−α) and distillation (α); ``distill_alpha`` = 0.4.
        beta: Extra scale β of the distillation term; ``distill_fd_beta`` = 100.
    """

    def __init__(self, alpha: float = 0.4, beta: float = 100.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.beta = float(beta)

    def forward(
        self, logits: Tensor, target: Tensor, student_features: Tensor, teacher_features: Tensor
    ) -> dict[str, Tensor]:
        """Args: logits (B, C), target (B,), student_features (B, D), teacher_features (B, D).

        Returns:
            ``{'loss': total, 'ce': mean CE, 'feature_distill': mean(1 − cos)}``; the parts are unweighted.
        """
        ce = F.cross_entropy(logits, target)
        fd = feature_distillation(student_features, teacher_features)
        total = (1.0 - self.alpha) * ce + self.alpha * self.beta * fd
        return {"loss": total, "ce": ce, "feature_distill": fd}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """timm's ``SoftTargetCrossEntropy``: ``mean_i Σ_c −t_ic · log_softmax(z)_ic`` for (B, C) targets."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def deit_lt_loss_parts(
    cls_logits: Tensor,
    dist_logits: Tensor,
    cls_targets: Tensor,
    teacher_logits: Tensor,
    dist_class_weight: Tensor | None = None,
    alpha: float = 0.5,
) -> dict[str, Tensor]:
    """:func:`deit_lt_loss` with its parts: ``{'loss', 'cls', 'dist'}`` (the parts unweighted by α)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if cls_targets.ndim == 2:
        l_cls = soft_target_cross_entropy(cls_logits, cls_targets)
    else:
        l_cls = F.cross_entropy(cls_logits, cls_targets)
    hard = teacher_logits.detach().argmax(dim=1)  # (B,) the teacher's class
    weight = None if dist_class_weight is None else dist_class_weight.to(dist_logits.dtype)
    l_dist = F.cross_entropy(dist_logits, hard, weight=weight)
    return {"loss": (1.0 - alpha) * l_cls + alpha * l_dist, "cls": l_cls, "dist": l_dist}


def deit_lt_loss(
    cls_logits: Tensor,
    dist_logits: Tensor,
    cls_targets: Tensor,
    teacher_logits: Tensor,
    dist_class_weight: Tensor | None = None,
    alpha: float = 0.5,
) -> Tensor:
    """DeiT-LT's hard-distillation loss ``(1−α)·L_cls + α·L_dist`` (METHODS.md §6.4).

    Args:
        cls_logits: CLS-head logits (B, C).
        dist_logits: DIST-head logits (B, C).
        cls_targets: (B, C) soft targets (Mixup + label smoothing) → soft-target CE; or (B,) labels → plain CE.
        teacher_logits: (B, C) raw teacher logits; the DIST target is their argmax (no gradient).
        dist_class_weight: optional (C,) weight of the DIST CE, indexed by the teacher-predicted class (DRW).
        alpha: weight of the distillation term (0.5).

    Returns:
        A scalar.
    """
    return deit_lt_loss_parts(cls_logits, dist_logits, cls_targets, teacher_logits, dist_class_weight, alpha)["loss"]
