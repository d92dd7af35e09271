"""How parameters change, independent of what is learned: a standard step, or SAM's two passes.

An Updater receives ``compute_loss`` (a closure the Trainer builds: the method's ``training_step`` under autocast with
the NaN guard), so it works with any Method. SAM (METHODS.md §3.2, Saddle-LongTail ``cifar_train_sam.py``): forward
and backward, ``first_step``; forward and backward again on the same batch at the perturbed point, ``second_step``.
The loss reported is the second pass's, as in the official loop. BatchNorm running statistics are updated on both
passes as in the official code; ``freeze_bn_second_pass=True`` keeps them from the first pass only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from pipeline.optim.sam import SAM
from pipeline.registry import Registry
from pipeline.train.method import StepOutput

UPDATERS: Registry = Registry("updater")


def _clip(params: list[torch.Tensor], max_norm: float | None) -> None:
    if max_norm:
        nn.utils.clip_grad_norm_(params, max_norm)


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@UPDATERS.register("standard")
class StandardUpdate:
    """zero_grad, forward, backward, (clip), step."""

    def __init__(self, rho_schedule: Callable[[int], float] | None = None) -> None:
        del rho_schedule

    def on_epoch_start(self, epoch: int, optimizer: Optimizer) -> None:
        """Nothing varies per epoch for a standard step."""

    def update(self, model: nn.Module, compute_loss: Callable[[], StepOutput], optimizer: Optimizer,
               grad_clip: float | None = None) -> StepOutput:
        optimizer.zero_grad(set_to_none=True)
        out = compute_loss()
        out.loss.backward()
        _clip(_params(optimizer), grad_clip)
        optimizer.step()
        return out


class _FrozenBN:
    """Context manager that stops BatchNorm running-statistics updates (momentum 0) for the second SAM pass."""

    def __init__(self, model: nn.Module, active: bool) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, _BatchNorm)] if active else []

    def __enter__(self) -> None:
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, mom in zip(self.bns, self.saved, strict=True):
            m.momentum = mom


@UPDATERS.register("sam")
class SAMUpdate:
    """Sharpness-aware update with a rho that is a pure function of the epoch.

    Args:
        rho_schedule: epoch → rho (constant, step or linear, ``pipeline.optim.schedules``).
        freeze_bn_second_pass: keep BN running statistics from the first pass only (official: False).
    """

    def __init__(self, rho_schedule: Callable[[int], float], freeze_bn_second_pass: bool = False) -> None:
        self.rho_schedule = rho_schedule
        self.freeze_bn_second_pass = freeze_bn_second_pass

    def on_epoch_start(self, epoch: int, optimizer: Optimizer) -> None:
        for group in optimizer.param_groups:
            group["rho"] = self.rho_schedule(epoch)

    def update(self, model: nn.Module, compute_loss: Callable[[], StepOutput], optimizer: Optimizer,
               grad_clip: float | None = None) -> StepOutput:
        if not isinstance(optimizer, SAM):
            raise TypeError("the 'sam' updater needs a SAM optimizer (build.create_optimizer with updater 'sam')")
        optimizer.zero_grad(set_to_none=True)
        compute_loss().loss.backward()
        _clip(_params(optimizer), grad_clip)
        optimizer.first_step(zero_grad=True)
        with _FrozenBN(model, self.freeze_bn_second_pass):
            out = compute_loss()
        out.loss.backward()
        _clip(_params(optimizer), grad_clip)
        optimizer.second_step(zero_grad=True)
        return out
