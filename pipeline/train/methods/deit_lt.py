"""DeiT-LT (Rangwani et al., CVPR 2024; val-iisc/DeiT-LT ``main.py``, ``engine.py``, ``losses.py``, METHODS.md §6).

A distilled ViT (CLS and DIST tokens, ``Network`` with a ``dist_head``) trained from scratch. Per update, once and
without gradients (``prepare_batch``):

1. timm's ``Mixup`` mixes the augmented batch with its flip (mixup α 0.8 / CutMix α 1.0, switch 0.5, one λ per
   batch, label smoothing 0.1) into soft targets; from the DRW epoch on with ``no_mixup_drw`` (CIFAR scripts) it
   stops and the CLS target is the hard label (plain CE, no smoothing);
2. the frozen teacher sees that same mixed batch, resized (bicubic) to its input side and, by default, re-normalised
   from the student's to its own statistics (``BatchAdapter``); its argmax is the DIST target: out-of-distribution
   distillation, since the teacher never saw such strongly augmented, mixed images.

The loss is ``pipeline.losses.deit_lt_loss``: ``(1−α)·L_cls + α·CE(dist, argmax teacher, weight=w)`` with α 0.5 and,
from the DRW epoch on, ``w`` the class-balanced weights (β 0.9999, sum C) indexed by the teacher's class.
``on_epoch_start`` switches both (a pure function of the epoch, so a resumed run matches). ``predict`` gives the
``avg`` (main: mean of the two heads' logits), ``cls`` and ``dist`` heads.

Departures (documented options): the teacher input is re-normalised by default (``teacher_renormalize``; the
official code feeds ImageNet-normalised tensors to a CIFAR-normalised teacher); the model EMA the official code keeps
but never evaluates is not kept; without DRW the DIST loss is unweighted (the official 1-tuple bug weights it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.losses import deit_lt_loss_parts, drw_weights
from pipeline.models.network import Network
from pipeline.train.method import Method, StepOutput


class DeiTLT(Method):
    """Out-of-distribution hard distillation into a distilled ViT, DRW on the DIST head.

    Args:
        network: the student, a ``Network`` with a ``dist_head`` (distilled ViT backbone).
        teacher: any frozen network whose ``forward`` gives (B, C) logits (a pipeline model via ``load_network``).
        teacher_adapter: maps the student's batch to the teacher's input (resize, normalisation).
        class_counts: training images per class (C,), for the DRW weights.
        mixup: a ``timm.data.Mixup`` (or None: no mixing, hard labels throughout).
        alpha: weight of the distillation term (0.5).
        drw_epoch: first 0-based epoch of DRW (CIFAR: 1100 of 1200); None = never.
        cb_beta: effective-number β of the DRW weights.
        no_mixup_drw: stop Mixup and label smoothing from the DRW epoch on (CIFAR scripts).
    """

    head_names = ("avg", "cls", "dist")

    def __init__(self, network: Network, teacher: nn.Module, teacher_adapter: nn.Module, class_counts: Sequence[int],
                 mixup=None, alpha: float = 0.5, drw_epoch: int | None = None, cb_beta: float = 0.9999,
                 no_mixup_drw: bool = True) -> None:
        super().__init__()
        if not network.distilled:
            raise ValueError("DeiT-LT needs a distilled ViT student (a backbone with a DIST token and a dist_head)")
        self.network = network
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_adapter = teacher_adapter
        self.mixup = mixup
        self.alpha = float(alpha)
        self.drw_epoch, self.no_mixup_drw = drw_epoch, bool(no_mixup_drw)
        self.register_buffer("drw_weight", drw_weights(list(class_counts), cb_beta).float(), persistent=False)
        self.dist_weight: Tensor | None = None
        self.mixup_active = mixup is not None

    def train(self, mode: bool = True) -> DeiTLT:
        super().train(mode)
        self.teacher.eval()  # the frozen teacher never switches to training mode (BN statistics stay fixed)
        return self

    def param_groups(self) -> list[dict]:
        """timm's rule (``param_groups_weight_decay``): no weight decay on 1-D parameters and on ``pos_embed``,
        ``cls_token``, ``dist_token``; the other group takes the optimizer's weight decay."""
        skip = {f"backbone.{n}" for n in getattr(self.network.backbone, "no_weight_decay", lambda: set())()}
        decay, no_decay = [], []
        for name, p in self.network.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def on_epoch_start(self, epoch: int) -> None:
        drw = self.drw_epoch is not None and epoch >= self.drw_epoch
        self.dist_weight = self.drw_weight if drw else None
        self.mixup_active = self.mixup is not None and not (drw and self.no_mixup_drw)

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        x, y = batch["images"][0], batch["labels"]
        if self.mixup_active:
            x, targets = self.mixup(x.clone(), y)  # (B, 3, H, W) mixed with its flip, (B, C) soft targets
        else:
            targets = y
        teacher_in = self.teacher_adapter(x)  # resized to the teacher's side, in its normalisation
        teacher_logits = self.teacher(teacher_in).float()  # (B, C)
        return {**batch, "images": [x], "targets": targets, "teacher_logits": teacher_logits}

    def training_step(self, batch: dict) -> StepOutput:
        cls_tok, dist_tok = self.network.forward_tokens(batch["images"][0])
        cls, dist = self.network.head(cls_tok).float(), self.network.dist_head(dist_tok).float()  # (B, C) each
        out = deit_lt_loss_parts(cls, dist, batch["targets"], batch["teacher_logits"],
                                 dist_class_weight=self.dist_weight, alpha=self.alpha)
        return StepOutput(loss=out["loss"], parts={"cls": out["cls"].detach(), "dist": out["dist"].detach()},
                          logits=(cls + dist) / 2)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        return self.network.forward_heads(images)

    def export(self) -> Network:
        return self.network

    @torch.no_grad()
    def predict_and_embed(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.network.forward_heads_and_features(images)  # one backbone pass for logits and features
