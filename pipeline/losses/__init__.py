"""Losses for long-tailed recognition, behind the ``LOSSES`` registry.

Every registered loss is an ``nn.Module`` with ``forward(logits, target, weight=None)`` returning a scalar and
accepts ``class_counts`` (ignored where unused), so ``pipeline.build`` can inject it uniformly:
``create_loss("ldam", class_counts=counts, max_margin=0.5)``. PaCo and CBD distillation need more inputs and
are constructed directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from pipeline.losses.ce import CrossEntropyLoss, FocalLoss, class_balanced_weights
from pipeline.losses.distill import (
    CBDDistillLoss,
    deit_lt_loss,
    deit_lt_loss_parts,
    feature_distillation,
    soft_target_cross_entropy,
)
from pipeline.losses.drw import DRWSchedule, class_weight_schedule, drw_weights, drw_weights_at
from pipeline.losses.ldam import LDAMLoss
from pipeline.losses.logit_adjust import BalancedSoftmaxLoss, LogitAdjustedLoss, logit_adjust_posthoc
from pipeline.losses.paco import PaCoLoss
from pipeline.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")
LOSSES.register("ce")(CrossEntropyLoss)
LOSSES.register("focal")(FocalLoss)
LOSSES.register("balanced_softmax")(BalancedSoftmaxLoss)
LOSSES.register("logit_adjusted")(LogitAdjustedLoss)
LOSSES.register("ldam")(LDAMLoss)


def create_loss(name: str, *, class_counts: Sequence[int], **kwargs: Any) -> nn.Module:
    """Builds a registered loss; ``class_counts`` is passed to every loss (ignored by CE and focal).

    Raises:
        pipeline.registry.UnknownNameError: ``name`` is not registered (the message lists valid names).
    """
    return LOSSES.create(name, class_counts=class_counts, **kwargs)


__all__ = [
    "LOSSES",
    "BalancedSoftmaxLoss",
    "CBDDistillLoss",
    "CrossEntropyLoss",
    "DRWSchedule",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "PaCoLoss",
    "class_balanced_weights",
    "class_weight_schedule",
    "create_loss",
    "deit_lt_loss",
    "deit_lt_loss_parts",
    "drw_weights",
    "drw_weights_at",
    "feature_distillation",
    "logit_adjust_posthoc",
    "soft_target_cross_entropy",
]
