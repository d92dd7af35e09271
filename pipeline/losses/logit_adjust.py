"""Balanced Softmax and logit-adjusted cross-entropy (METHODS.md §2.6).

References:
    * Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020, Eq. (4);
      jiawei-ren/BalancedMetaSoftmax-Classification ``loss/BalancedSoftmaxLoss.py``: ``CE(z + log n, y)``.
    * Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, Eq. (10) (loss) and Eq. (9)
      (post-hoc); google-research ``logit_adjustment/utils.py`` / ``main.py``: ``z ± log(π^τ + 1e-12)``.

    * Long et al., "Retrieval Augmented Classification for Long-Tail Visual Recognition", CVPR 2022 (RAC), Eq. (3)
      (LACE with label smoothing 0.1) and Appendix A.1 (re-weighting α_y = 1/√N_y or 1/log N_y), METHODS.md §8.

Both adjustments apply only during training; at test time the raw logits are used (or, for the post-hoc
variant, ``logit_adjust_posthoc``). The two losses agree up to a per-row constant (log N), so they give the
same softmax and the same loss when τ = 1.

RAC's options of :class:`LogitAdjustedLoss` (no official code; choices of this implementation):
    * ``label_smoothing`` is PyTorch's: the target is (1 − ε)·onehot(y) + ε/C, applied to the *adjusted* logits.
    * ``reweight`` gives α_y = 1/√N_y (``inv_sqrt``) or 1/log N_y (``inv_log``, needs every N_y ≥ 2 since log 1 = 0),
      normalised to mean 1 over classes; a ``weight`` passed to ``forward`` multiplies it elementwise. Reduction is
      PyTorch's weighted mean Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i} (also with smoothing), so the overall scale of the weights
      cancels: the normalisation only makes the stored ``class_weight`` buffer readable.
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


REWEIGHTS = ("none", "inv_sqrt", "inv_log")


def _reweight_alpha(class_counts: Sequence[int] | Tensor, reweight: str) -> Tensor | None:
    """RAC Appendix A.1 per-class weights α (C,), normalised to mean 1; None for ``"none"``."""
    if reweight not in REWEIGHTS:
        raise ValueError(f"unknown reweight {reweight!r}; valid choices: {', '.join(REWEIGHTS)}")
    if reweight == "none":
        return None
    counts = torch.as_tensor(_as_counts(class_counts), dtype=torch.float64)  # (C,)
    minimum = 2 if reweight == "inv_log" else 1  # 1/log(1) and 1/sqrt(0) are infinite
    bad = (counts < minimum).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"reweight={reweight!r} needs every class count >= {minimum}; classes {bad} have counts "
            f"{counts[bad].long().tolist()}; use reweight='none'" + (" or 'inv_sqrt'" if reweight == "inv_log" else "")
        )
    alpha = counts.rsqrt() if reweight == "inv_sqrt" else 1.0 / counts.log()
    return (alpha / alpha.mean()).to(torch.get_default_dtype())


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy ``CE(z + log(π^τ + 1e-12), y)`` (Menon et al. Eq. 10; RAC's LACE, Eq. 3).

    With the defaults (no smoothing, no re-weighting) this is exactly the plain logit-adjusted loss.

    Args:
        class_counts: Training samples per class (C,); the prior is π = n / Σn.
        tau: Adjustment strength τ; τ = 0 adds the same constant to every logit, i.e. plain CE.
        label_smoothing: ε of PyTorch's label smoothing (RAC: 0.1).
        reweight: ``"none"`` (RAC's default, α_y = 1), ``"inv_sqrt"`` (α_y ∝ 1/√N_y) or ``"inv_log"`` (α_y ∝ 1/log N_y).
    """

    log_prior: Tensor
    class_weight: Tensor | None

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
        reweight: str = "none",
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.tau = float(tau)
        self.label_smoothing = float(label_smoothing)
        self.reweight = reweight
        self.register_buffer("log_prior", _log_prior(class_counts, self.tau), persistent=False)  # (C,)
        self.register_buffer("class_weight", _reweight_alpha(class_counts, reweight), persistent=False)  # (C,) | None

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Args: logits (B, C), target (B,), weight (C,) or None (multiplies α). Returns a scalar."""
        w = self.class_weight
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
            w = weight if w is None else w.to(logits.dtype) * weight  # (C,) elementwise α_y · w_y
        elif w is not None:
            w = w.to(logits.dtype)
        adjusted = logits + self.log_prior.to(logits.dtype)  # (B, C)
        return F.cross_entropy(adjusted, target, weight=w, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, label_smoothing={self.label_smoothing}, reweight={self.reweight!r}"
