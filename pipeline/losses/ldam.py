"""Label-Distribution-Aware Margin (LDAM) loss.

Reference: Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019,
Eq. (13); official kaidic/LDAM-DRW ``losses.py: LDAMLoss`` (METHODS.md §2.2).

``m_j = max_m · (n_min / n_j)^{1/4}`` (the rarest class gets exactly ``max_m``); the margin is subtracted from
the true-class logit only, and the scale ``s`` multiplies afterwards: ``CE(s·(z − m_y·onehot(y)), y, weight)``.
The official code stores the margins as a CUDA-only float tensor; here they are a buffer that follows the
module's device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.ce import _as_counts

logger = logging.getLogger(__name__)


class LDAMLoss(nn.Module):
    """LDAM loss on cosine logits.

    The logits are expected to be cosine similarities in [-1, 1] from a ``NormedLinear`` (cosine) head, as in
    the official code (``use_norm = loss_type == 'LDAM'``); with an ordinary linear head the margin is
    meaningless relative to the logit scale.

    Args:
        class_counts: Training samples per class (C,), all > 0.
        max_margin: Margin of the rarest class (0.5 on CIFAR, 0.3 for ImageNet-LT/iNat in Saddle-LongTail).
        scale: Logit scale ``s`` applied after the margin.
    """

    margins: Tensor

    def __init__(self, class_counts: Sequence[int] | Tensor, max_margin: float = 0.5, scale: float = 30.0) -> None:
        super().__init__()
        if max_margin < 0:
            raise ValueError(f"max_margin must be >= 0, got {max_margin}")
        counts = torch.as_tensor(_as_counts(class_counts, allow_zero=False), dtype=torch.float64)
        margins = 1.0 / torch.sqrt(torch.sqrt(counts))  # n_j^{-1/4}
        margins = margins * (max_margin / margins.max())
        self.max_margin = float(max_margin)
        self.scale = float(scale)
        self.register_buffer("margins", margins.to(torch.get_default_dtype()), persistent=False)  # (C,)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Args: logits (B, C) cosine logits, target (B,), weight (C,) or None. Returns a scalar.

        With ``weight`` the reduction is PyTorch's weighted mean ``Σ w_{y_i} nll_i / Σ w_{y_i}``.
        """
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        onehot = F.one_hot(target, num_classes=logits.shape[1]).to(logits.dtype)  # (B, C)
        batch_margin = self.margins.to(logits.dtype)[target].unsqueeze(1)  # (B, 1)
        adjusted = logits - batch_margin * onehot  # margin on the true class only
        return F.cross_entropy(self.scale * adjusted, target, weight=weight)

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin}, scale={self.scale}"
