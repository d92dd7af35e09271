"""Cross-entropy, focal loss and class-balanced (effective-number) class weights.

References:
    * Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019, Eq. (3):
      ``w_j ∝ (1 - β) / (1 - β^{n_j})``.
    * Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. (4), in the form used by
      kaidic/LDAM-DRW ``losses.py: FocalLoss`` (METHODS.md §2.4).
    * The weight normalisation (sum = C) follows kaidic/LDAM-DRW ``cifar_train.py`` (METHODS.md §2.3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _as_counts(class_counts: Sequence[int] | Tensor | np.ndarray, *, allow_zero: bool = True) -> np.ndarray:
    """Validates per-class counts and returns them as a float64 array of shape (C,)."""
    counts = np.asarray(
        class_counts.detach().cpu().numpy() if isinstance(class_counts, Tensor) else class_counts, dtype=np.float64
    )
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence of per-class counts, got shape {counts.shape}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError(f"class_counts must be finite and >= 0, got {counts.tolist()}")
    if not allow_zero and (counts == 0).any():
        bad = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"class_counts must be > 0 for this loss; classes {bad} have zero training samples")
    return counts


def class_balanced_weights(class_counts: Sequence[int] | Tensor | np.ndarray, beta: float = 0.9999) -> Tensor:
    """Class-balanced (effective-number) per-class weights, normalised to sum to C.

    ``w_j = (1 - β) / (1 - β^{n_j})`` then ``w <- w / Σw · C`` (METHODS.md §2.3). ``beta=0`` gives all ones,
    which is how DRW expresses "no re-weighting" before its switch epoch.

    Args:
        class_counts: Training samples per class, shape (C,).
        beta: Effective-number hyper-parameter in [0, 1).

    Returns:
        A float tensor of shape (C,) in the default dtype, on the CPU.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    counts = _as_counts(class_counts, allow_zero=False)
    effective_num = 1.0 - np.power(beta, counts)  # (C,)
    weights = (1.0 - beta) / effective_num
    weights = weights / weights.sum() * counts.size
    return torch.tensor(weights, dtype=torch.get_default_dtype())


class CrossEntropyLoss(nn.Module):
    """Plain softmax cross-entropy with an optional per-class weight given at call time.

    With ``weight`` the reduction is PyTorch's weighted mean ``Σ_i w_{y_i}·nll_i / Σ_i w_{y_i}``.

    Args:
        class_counts: Accepted (and ignored) so every loss can be built with the same keyword arguments.
    """

    def __init__(self, class_counts: Sequence[int] | None = None) -> None:
        super().__init__()

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Args: logits (B, C), target (B,) class indices, weight (C,) or None. Returns a scalar."""
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(logits, target, weight=weight)


class FocalLoss(nn.Module):
    """Focal loss exactly as kaidic/LDAM-DRW ``losses.py: FocalLoss`` (METHODS.md §2.4).

    ``ce_i = w_{y_i}·(-log p_{y_i})``, ``p_i = exp(-ce_i)``, ``loss = mean_i (1 - p_i)^γ · ce_i``.
    With weights, ``p_i`` is not the true probability and the batch reduction is a plain mean (not
    weight-normalised): both as in the official code. ``gamma=0`` without weights is plain cross-entropy.

    Args:
        gamma: Focusing parameter γ ≥ 0 (the official runs use 1).
        class_counts: Accepted and ignored (uniform builder interface).
    """

    def __init__(self, gamma: float = 1.0, class_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Args: logits (B, C), target (B,), weight (C,) or None. Returns a scalar."""
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        ce = F.cross_entropy(logits, target, weight=weight, reduction="none")  # (B,)
        p = torch.exp(-ce)
        return ((1.0 - p) ** self.gamma * ce).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
