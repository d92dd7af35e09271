"""Class-Balanced Distillation (CBD) feature-distillation loss.

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
