"""Learning-rate and SAM-rho schedules as pure functions of the 0-based epoch.

Each function reproduces one official recipe (METHODS.md), including its quirks:

* ``ldam_drw_lr``: kaidic/LDAM-DRW ``cifar_train.py: adjust_learning_rate`` (§2.5): 1-based e, linear warm-up
  ``lr·e/5`` for e ≤ 5, then ×0.01 after e > 160 and ×1e-4 after e > 180 (a 100× first drop).
* ``paco_cifar_lr``: PaCo ``paco_cifar.py: adjust_learning_rate`` (§4.3): the warm-up covers 0-based epochs
  0..10 (11 epochs), so epoch 10 runs at 1.1×lr.
* ``paco_cosine_lr``: PaCo ``paco_lt.py`` (§4.3): warm-up for e < 10, then cosine with the (e−w+1)/(E−w+1) phase.
* ``cosine_lr``: ``CosineAnnealingLR(T_max=epochs)`` stepped after each epoch (Saddle-LongTail ``--cos_lr``).
* ``cosine_lr_classifier_balancing``: classifier-balancing ``run_networks.py`` (§5.1) steps the scheduler at the
  start of each epoch, so epoch k uses step k+1 and the last epoch has lr 0.
* ``timm_cosine_lr``: timm ``CosineLRScheduler`` as DeiT / DeiT-LT build it (§6.5): linear warm-up from
  ``warmup_lr`` over ``warmup`` epochs, then ``min_lr + ½(base − min_lr)(1 + cos(π·e/epochs))`` (the cosine phase
  counts from epoch 0, timm's ``warmup_prefix=False``). Departure: evaluated at the start of each epoch; DeiT-LT's
  CIFAR scripts step it per iteration at fractional epochs (accum-iter 4), its other scripts once per epoch.
* rho schedules: Saddle-LongTail ``cifar_train_sam.py: adjust_rho`` (§3.2), with 1-based e inside.

``create_lr_schedule`` / ``create_rho_schedule`` bind the keyword arguments and return ``epoch -> value``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

Schedule = Callable[[int], float]


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise ValueError(f"epoch must be a 0-based index >= 0, got {epoch}")


# --------------------------------------------------------------------------------------------- learning rate


def constant_lr(epoch: int, base_lr: float) -> float:
    """The same lr at every epoch."""
    _check_epoch(epoch)
    return base_lr


def step_lr(epoch: int, base_lr: float, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """``base_lr · gamma^{#milestones ≤ epoch}`` (``torch.optim.lr_scheduler.MultiStepLR`` per epoch)."""
    _check_epoch(epoch)
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def ldam_drw_lr(
    epoch: int,
    base_lr: float = 0.1,
    warmup: int = 5,
    milestones: Sequence[int] = (160, 180),
    factors: Sequence[float] = (0.01, 1e-4),
) -> float:
    """LDAM-DRW CIFAR schedule (METHODS.md §2.5); defaults give 0.02 at epoch 0, 0.1 at 5-159, 1e-3 at
    160-179 and 1e-5 at 180-199.

    Args:
        epoch: 0-based epoch (the official code uses e = epoch + 1).
        base_lr: Peak lr.
        warmup: Warm-up epochs; e ≤ warmup gives ``base_lr·e/warmup``.
        milestones: 1-based epochs after which (e > m) ``factors`` apply, ascending.
        factors: Multipliers of ``base_lr`` after each milestone (absolute, not cumulative).
    """
    _check_epoch(epoch)
    if len(milestones) != len(factors):
        raise ValueError(f"milestones {tuple(milestones)} and factors {tuple(factors)} must have the same length")
    e = epoch + 1
    if e <= warmup:
        return base_lr * e / warmup
    passed = sum(1 for m in milestones if e > m)
    return base_lr * (factors[passed - 1] if passed else 1.0)


def paco_cifar_lr(
    epoch: int,
    base_lr: float = 0.05,
    warmup: int = 10,
    milestones: Sequence[int] = (320, 360),
    factors: Sequence[float] = (0.1, 0.01),
) -> float:
    """PaCo CIFAR schedule (METHODS.md §4.3), 0-based e.

    e ≤ warmup → ``base_lr/warmup·(e+1)`` (⚠ official quirk: epoch ``warmup`` runs at 1.1×lr);
    e > 360 → 0.01·lr; e > 320 → 0.1·lr; else lr. ``warmup`` 0: no warm-up (a shortened run whose 2.5 % warm-up
    falls inside its first epoch).
    """
    _check_epoch(epoch)
    if len(milestones) != len(factors):
        raise ValueError(f"milestones {tuple(milestones)} and factors {tuple(factors)} must have the same length")
    if warmup > 0 and epoch <= warmup:
        return base_lr / warmup * (epoch + 1)
    passed = sum(1 for m in milestones if epoch > m)
    return base_lr * (factors[passed - 1] if passed else 1.0)


def paco_cosine_lr(epoch: int, base_lr: float, epochs: int, warmup: int = 10) -> float:
    """PaCo ImageNet-LT/iNat/Places schedule (METHODS.md §4.3), 0-based e.

    e < warmup → ``base_lr/warmup·(e+1)``; else ``base_lr·0.5·(1 + cos(π·(e−warmup+1)/(epochs−warmup+1)))``.
    """
    _check_epoch(epoch)
    if epoch < warmup:
        return base_lr / warmup * (epoch + 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup + 1) / (epochs - warmup + 1)))


def cosine_lr(epoch: int, base_lr: float, epochs: int, warmup: int = 0, eta_min: float = 0.0) -> float:
    """Per-epoch cosine annealing with an optional linear warm-up.

    Without warm-up this is ``CosineAnnealingLR(T_max=epochs, eta_min)`` stepped after each epoch: epoch 0 runs
    at ``base_lr``. With warm-up, epochs 0..warmup-1 run at ``base_lr·(e+1)/warmup`` and the cosine spans the
    remaining ``epochs − warmup`` epochs.
    """
    _check_epoch(epoch)
    if epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    span = max(epochs - warmup, 1)
    return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))


def cosine_lr_classifier_balancing(epoch: int, base_lr: float, epochs: int, eta_min: float = 0.0) -> float:
    """classifier-balancing cosine (METHODS.md §5.1): ``scheduler.step()`` runs at the start of each epoch, so
    0-based epoch k trains at the cosine value of step k+1 and the last epoch at ``eta_min`` (0)."""
    _check_epoch(epoch)
    return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * (epoch + 1) / epochs))


def timm_cosine_lr(epoch: int, base_lr: float, epochs: int, warmup: int = 5, warmup_lr: float = 1e-6,
                   min_lr: float = 1e-5) -> float:
    """timm ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_t, warmup_lr_init)`` at 0-based epoch ``epoch``.

    DeiT-LT: warm-up 5 epochs from 1e-6, minimum 1e-5 (METHODS.md §6.5).
    """
    _check_epoch(epoch)
    if epoch < warmup:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


LR_SCHEDULES: Registry[Schedule] = Registry("lr schedule")


def _bind(fn: Callable[..., float], kind: str, **kwargs: Any) -> Schedule:
    """Binds keyword arguments to ``fn(epoch, ...)``, rejecting unknown ones now rather than at the first call."""
    params = [p for p in inspect.signature(fn).parameters if p != "epoch"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"{kind} {fn.__name__} got unknown arguments {unknown}; valid arguments: {params}")
    bound = partial(fn, **kwargs)
    inspect.signature(bound).bind(0)  # raises TypeError when a required argument is missing
    return bound


def _register_lr(name: str, fn: Callable[..., float], *, uses_epochs: bool) -> None:
    def factory(*, base_lr: float, epochs: int, **kwargs: Any) -> Schedule:
        if uses_epochs:
            kwargs["epochs"] = epochs
        return _bind(fn, "lr schedule", base_lr=base_lr, **kwargs)

    LR_SCHEDULES.register(name)(factory)


_register_lr("constant", constant_lr, uses_epochs=False)
_register_lr("step", step_lr, uses_epochs=False)
_register_lr("ldam_drw", ldam_drw_lr, uses_epochs=False)
_register_lr("paco_cifar", paco_cifar_lr, uses_epochs=False)
_register_lr("paco_cosine", paco_cosine_lr, uses_epochs=True)
_register_lr("cosine", cosine_lr, uses_epochs=True)
_register_lr("cosine_classifier_balancing", cosine_lr_classifier_balancing, uses_epochs=True)
_register_lr("timm_cosine", timm_cosine_lr, uses_epochs=True)


def create_lr_schedule(name: str, *, base_lr: float, epochs: int, **kwargs: Any) -> Schedule:
    """Returns ``epoch (0-based) -> lr`` for a registered schedule.

    Args:
        name: One of ``LR_SCHEDULES.names()``.
        base_lr: Peak learning rate.
        epochs: Total epochs (used by the cosine schedules, ignored by the others).
        **kwargs: Further arguments of the schedule function (e.g. ``warmup``, ``milestones``).

    Raises:
        pipeline.registry.UnknownNameError: ``name`` is not registered.
        TypeError: An argument the schedule does not take.
    """
    return LR_SCHEDULES.create(name, base_lr=base_lr, epochs=epochs, **kwargs)


# --------------------------------------------------------------------------------------------- SAM rho


def rho_constant(epoch: int, rho: float) -> float:
    """Saddle-LongTail ``rho_schedule='none'``: the same rho every epoch."""
    _check_epoch(epoch)
    return rho


def rho_step(
    epoch: int,
    values: Sequence[float] = (0.05, 0.1, 0.5, 0.6),
    boundaries: Sequence[int] = (5, 160, 180),
) -> float:
    """Saddle-LongTail step rho with 1-based e = epoch + 1 (METHODS.md §3.2).

    ``values = (a, b, c, d)``, ``boundaries = (w, m1, m2)``: e ≤ w → a; e > m2 → d; e > m1 → c; else b.
    CIFAR: defaults. ImageNet-LT/iNat: ``boundaries=(5, 60, 75)`` with ``--rho_steps a b c d`` as ``values``.
    """
    _check_epoch(epoch)
    if len(values) != 4 or len(boundaries) != 3:
        raise ValueError(f"rho_step needs 4 values and 3 boundaries, got values={values}, boundaries={boundaries}")
    a, b, c, d = values
    warm, first, second = boundaries
    e = epoch + 1
    if e <= warm:
        return a
    if e > second:
        return d
    if e > first:
        return c
    return b


def rho_linear(epoch: int, epochs: int, min_rho: float = 0.05, max_rho: float = 0.8) -> float:
    """Linear rho from ``min_rho`` at e = 1 to ``max_rho`` at e = epochs (1-based e = epoch + 1).

    The official code casts the result to ``np.float16``; this returns the exact float (a deliberate
    difference of at most ~4e-4 at rho ≤ 0.8).
    """
    _check_epoch(epoch)
    if epochs <= 1:
        return max_rho
    e = min(epoch + 1, epochs)
    return min_rho + (max_rho - min_rho) * (e - 1) / (epochs - 1)


RHO_SCHEDULES: Registry[Schedule] = Registry("rho schedule")


def _constant_factory(*, rho: float, epochs: int, **kwargs: Any) -> Schedule:
    return _bind(rho_constant, "rho schedule", rho=rho, **kwargs)


def _step_factory(*, rho: float, epochs: int, **kwargs: Any) -> Schedule:
    # rho is ignored: the step values replace it, as in the official adjust_rho.
    return _bind(rho_step, "rho schedule", **kwargs)


def _linear_factory(*, rho: float, epochs: int, **kwargs: Any) -> Schedule:
    # rho is ignored: min_rho/max_rho replace it, as in the official adjust_rho.
    return _bind(rho_linear, "rho schedule", epochs=epochs, **kwargs)


RHO_SCHEDULES.register("constant")(_constant_factory)
RHO_SCHEDULES.register("none")(_constant_factory)  # the official name of the constant schedule
RHO_SCHEDULES.register("step")(_step_factory)
RHO_SCHEDULES.register("linear")(_linear_factory)


def create_rho_schedule(name: str, *, rho: float, epochs: int, **kwargs: Any) -> Schedule:
    """Returns ``epoch (0-based) -> rho`` for a registered schedule.

    Args:
        name: ``'constant'`` (alias ``'none'``), ``'step'`` or ``'linear'``.
        rho: The constant rho (ignored by ``step`` and ``linear``, whose own arguments set the values).
        epochs: Total epochs (used by ``linear``).
        **kwargs: ``values``/``boundaries`` for ``step``; ``min_rho``/``max_rho`` for ``linear``.
    """
    return RHO_SCHEDULES.create(name, rho=rho, epochs=epochs, **kwargs)


__all__ = [
    "LR_SCHEDULES",
    "RHO_SCHEDULES",
    "Schedule",
    "constant_lr",
    "cosine_lr",
    "cosine_lr_classifier_balancing",
    "create_lr_schedule",
    "timm_cosine_lr",
    "create_rho_schedule",
    "ldam_drw_lr",
    "paco_cifar_lr",
    "paco_cosine_lr",
    "rho_constant",
    "rho_linear",
    "rho_step",
    "step_lr",
]
