"""Balanced Softmax and logit-adjusted cross-entropy (METHODS.md §2.6).

References:
    * Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020, Eq. (4);
      jiawei-ren/BalancedMetaSoftmax-Classification ``loss/BalancedSoftmaxLoss.py``: ``CE(z + log n, y)``.
    * Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, Eq. (10) (loss) and Eq. (9)
      (post-hoc); google-research ``logit_adjustment/utils.py`` / ``main.py``: ``z ± log(π^τ + 1e-12)``.

Both adjustments apply only during training; at test time the raw logits are used (or, for the post-hoc
variant, ``logit_adjust_posthoc``). The two losses agree up to a per-row constant (log N), so they give the
same softmax and the same loss when τ = 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.ce import _as_counts

logger = logging.getLogger(__name__)

_LA_EPS = 1e-12  # google-research logit_adjustment: log(prior^tau + 1e-12)


def _log_prior(class_counts: Sequence[int] | Tensor, tau: float) -> Tensor:
    """``log(π^τ + 1e-12)`` with π = n / Σn, shape (C,)."""
    counts = torch.as_tensor(_as_counts(class_counts), dtype=torch.float64)
    prior = counts / counts.sum()
    return torch.log(prior**tau + _LA_EPS).to(torch.get_default_dtype())


def logit_adjust_posthoc(logits: Tensor, class_counts: Sequence[int] | Tensor, tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment ``z - log(π^τ + 1e-12)`` (Menon et al. Eq. 9).

    Args:
        logits: Raw logits (B, C).
        class_counts: Training samples per class (C,).
        tau: Adjustment strength; 0 leaves the argmax unchanged.

    Returns:
        Adjusted logits (B, C).
    """
    return logits - _log_prior(class_counts, tau).to(device=logits.device, dtype=logits.dtype)


class BalancedSoftmaxLoss(nn.Module):
    """Balanced Softmax: ``CE(z + log n_y, y)`` with mean (or PyTorch weighted-mean) reduction.

    As in the official code there is no epsilon: a class with zero training samples gets ``log 0 = -inf``
    added to its logit, i.e. it is never predicted during training and contributes nothing to the
    normaliser (a sample *labelled* with such a class would give an infinite loss).

    Args:
        class_counts: Training samples per class (C,).
    """

    log_counts: Tensor

    def __init__(self, class_counts: Sequence[int] | Tensor) -> None:
        super().__init__()
        counts = torch.as_tensor(_as_counts(class_counts), dtype=torch.get_default_dtype())
        if (counts == 0).any():
            logger.warning("BalancedSoftmaxLoss: zero-count classes %s get log(0) = -inf", (counts == 0).nonzero())
        self.register_buffer("log_counts", torch.log(counts), persistent=False)  # (C,)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Args: logits (B, C), target (B,), weight (C,) or None. Returns a scalar."""
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        adjusted = logits + self.log_counts.to(logits.dtype)  # (B, C)
        return F.cross_entropy(adjusted, target, weight=weight)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy ``CE(z + log(π^τ + 1e-12), y)`` (Menon et al. Eq. 10).

    Args:
        class_counts: Training samples per class (C,); the prior is π = n / Σn.
        tau: Adjustment strength τ; τ = 0 adds the same constant to every logit, i.e. plain CE.
    """

    log_prior: Tensor

    def __init__(self, class_counts: Sequence[int] | Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("log_prior", _log_prior(class_counts, self.tau), persistent=False)  # (C,)

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Args: logits (B, C), target (B,), weight (C,) or None. Returns a scalar."""
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target, weight=weight)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
