"""Deferred re-weighting (DRW) and "Reweight" class-weight schedules.

Reference: Cao et al., NeurIPS 2019, Alg. 1 (DRW); official kaidic/LDAM-DRW ``cifar_train.py`` (METHODS.md §2.3).

The weights are the class-balanced (effective-number) weights of Cui et al. (CVPR 2019), not ``1/n`` as the
paper's wording suggests (kaidic/LDAM-DRW#19). The official code computes ``idx = epoch // 160`` with
``betas = [0, 0.9999]``: epochs before the switch use β = 0 (all ones), epochs from the switch use β = 0.9999.
Schedules are pure functions of the 0-based epoch (the caller passes the result as ``weight=`` to the loss).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from pipeline.losses.ce import _as_counts, class_balanced_weights

logger = logging.getLogger(__name__)

WEIGHT_RULES = ("none", "reweight", "drw")


def drw_weights(class_counts: Sequence[int] | Tensor, beta: float = 0.9999) -> Tensor:
    """Class-balanced DRW weights ``(1-β)/(1-β^{n_j})`` normalised to sum C; ``beta=0`` gives all ones.

    Same as ``pipeline.losses.ce.class_balanced_weights`` (METHODS.md §2.3).
    """
    return class_balanced_weights(class_counts, beta)


def drw_weights_at(epoch: int, class_counts: Sequence[int] | Tensor, switch_epoch: int, beta: float = 0.9999) -> Tensor:
    """DRW weights for a 0-based ``epoch``: all ones before ``switch_epoch``, CB weights from it on.

    Args:
        epoch: 0-based epoch index.
        class_counts: Training samples per class (C,).
        switch_epoch: First 0-based epoch with re-weighting (160 on CIFAR, 60 on ImageNet-LT/iNat in Saddle).
        beta: Effective-number β used after the switch.

    Returns:
        Weights of shape (C,).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (0-based), got {epoch}")
    return class_balanced_weights(class_counts, beta if epoch >= switch_epoch else 0.0)


def class_weight_schedule(
    rule: str,
    epoch: int,
    class_counts: Sequence[int] | Tensor,
    switch_epoch: int = 160,
    beta: float = 0.9999,
) -> Tensor | None:
    """Per-class loss weights for ``epoch`` under the LDAM-DRW ``train_rule`` options.

    Args:
        rule: ``'none'`` (no weights), ``'reweight'`` (CB weights from epoch 0) or ``'drw'`` (CB weights from
            ``switch_epoch``). ``'Resample'`` is not offered: in the official code it is a no-op (issue #7).
        epoch: 0-based epoch.
        class_counts: Training samples per class (C,).
        switch_epoch: DRW switch (0-based); ignored by the other rules.
        beta: Effective-number β.

    Returns:
        Weights of shape (C,), or None for ``'none'``.
    """
    key = rule.lower()
    if key == "none":
        return None
    if key == "reweight":
        return class_balanced_weights(class_counts, beta)
    if key == "drw":
        return drw_weights_at(epoch, class_counts, switch_epoch, beta)
    raise ValueError(f"unknown class-weight rule {rule!r}; valid rules: {', '.join(WEIGHT_RULES)}")


@dataclass(frozen=True)
class DRWSchedule:
    """Callable DRW schedule: ``DRWSchedule(counts, switch_epoch=160)(epoch) -> weights (C,)``.

    Args:
        class_counts: Training samples per class (C,).
        switch_epoch: First 0-based epoch with class-balanced weights.
        beta: Effective-number β after the switch.
        rule: ``'drw'`` (default), ``'reweight'`` or ``'none'`` (then the call returns None).
    """

    class_counts: Sequence[int]
    switch_epoch: int = 160
    beta: float = 0.9999
    rule: str = "drw"
    _counts: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rule.lower() not in WEIGHT_RULES:
            raise ValueError(f"unknown class-weight rule {self.rule!r}; valid rules: {', '.join(WEIGHT_RULES)}")
        object.__setattr__(self, "_counts", tuple(_as_counts(self.class_counts).tolist()))

    def __call__(self, epoch: int) -> Tensor | None:
        return class_weight_schedule(self.rule, epoch, self._counts, self.switch_epoch, self.beta)
