"""Decoupled classifier learning on a frozen representation (Kang et al., ICLR 2020), classifier-balancing.

The backbone (and neck) of a trained network is frozen; a head is learnt with class-aware sampling:
- cRT: a re-initialised linear classifier with bias (METHODS.md §5.3),
- LWS: per-class scales ``s`` over the frozen joint classifier, ``(Wx + b) ⊙ s`` (§5.5),
- learnable τ: one τ over the frozen joint weight, ``x · τnorm(W)ᵀ`` (Kang et al. B.5).

As in the official code the frozen backbone is still put in train mode, so BatchNorm running statistics are updated
under class-balanced sampling (``update_bn=True``, the default); ``update_bn=False`` keeps them fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.network import Network
from pipeline.train.method import Method, StepOutput


class Decoupled(Method):
    """Train only ``network.head`` on top of the frozen ``network.backbone`` / ``network.neck``.

    Args:
        network: the network whose head is (re)learnt; every parameter outside ``head`` is frozen.
        update_bn: keep the official behaviour of updating BN statistics of the frozen backbone.
    """

    def __init__(self, network: Network, update_bn: bool = True) -> None:
        super().__init__()
        self.network, self.update_bn = network, update_bn
        for name, p in network.named_parameters():
            if not name.startswith("head."):
                p.requires_grad_(False)  # the head keeps its own flags (LWS: W and b frozen, only s trains)

    def train(self, mode: bool = True) -> Decoupled:
        super().train(mode)
        if not self.update_bn:
            self.network.backbone.eval()
        return self

    def training_step(self, batch: dict) -> StepOutput:
        with torch.no_grad():
            f = self.network.forward_features(batch["images"][0])  # (B, D), no gradient into the backbone
        logits = self.network.forward_head(f)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return StepOutput(loss=loss, parts={"ce": loss.detach()}, logits=logits)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        return {"main": self.network(images)}

    def export(self) -> nn.Module:
        return self.network

    @torch.no_grad()
    def predict_and_embed(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.network.forward_heads_and_features(images)  # one backbone pass for logits and features
