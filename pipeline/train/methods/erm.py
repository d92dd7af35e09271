"""Empirical risk minimisation with any classification loss: CE, focal, class-balanced (reweight), DRW, balanced
softmax, logit adjustment, LDAM (on a NormedLinear head). With the SAM updater this is Saddle-LongTail's recipe.

Per-class weights are a pure function of the epoch (``class_weight_schedule``: 'none', 'reweight' from epoch 0, or
'drw' from ``switch_epoch``, METHODS.md §2.3), recomputed in ``on_epoch_start`` so that a resumed run matches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pipeline.models.network import Network
from pipeline.train.method import Method, StepOutput


class ERM(Method):
    """One network, one loss ``loss(logits, target, weight=w_epoch)``.

    Args:
        network: backbone + head.
        loss: an ``nn.Module`` with ``forward(logits, target, weight=None)``.
        class_weight_fn: epoch → (C,) weights or None.
    """

    def __init__(self, network: Network, loss: nn.Module,
                 class_weight_fn: Callable[[int], Tensor | None] | None = None) -> None:
        super().__init__()
        self.network, self.loss = network, loss
        self.class_weight_fn = class_weight_fn
        self.class_weight: Tensor | None = None

    def on_epoch_start(self, epoch: int) -> None:
        w = self.class_weight_fn(epoch) if self.class_weight_fn is not None else None
        self.class_weight = None if w is None else w.to(next(self.network.parameters()).device)

    def training_step(self, batch: dict) -> StepOutput:
        logits = self.network(batch["images"][0])  # (B, C)
        loss = self.loss(logits.float(), batch["labels"], weight=self.class_weight)
        return StepOutput(loss=loss, parts={"ce": loss.detach()}, logits=logits)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        return {"main": self.network(images)}

    def export(self) -> Network:
        return self.network

    @torch.no_grad()
    def predict_and_embed(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.network.forward_heads_and_features(images)  # one backbone pass for logits and features
