"""Unit tests of the lr and rho schedules at the epochs listed in METHODS.md (§2.5, §3.2, §4.3, §5.1, §9)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.optim.schedules import (
    LR_SCHEDULES,
    RHO_SCHEDULES,
    cosine_lr,
    cosine_lr_classifier_balancing,
    create_lr_schedule,
    create_rho_schedule,
    ldam_drw_lr,
    paco_cifar_lr,
    paco_cosine_lr,
    rho_linear,
    rho_step,
    step_lr,
)
from pipeline.registry import UnknownNameError


def test_ldam_drw_table() -> None:
    assert [ldam_drw_lr(e) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    for epoch, lr in [(5, 0.1), (159, 0.1), (160, 1e-3), (179, 1e-3), (180, 1e-5), (199, 1e-5)]:
        assert ldam_drw_lr(epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_paco_cifar_warmup_quirk_and_steps() -> None:
    assert paco_cifar_lr(0) == pytest.approx(0.005)
    assert paco_cifar_lr(9) == pytest.approx(0.05)
    assert paco_cifar_lr(10) == pytest.approx(0.055)  # 11 warm-up epochs: epoch 10 at 1.1×lr
    assert paco_cifar_lr(11) == pytest.approx(0.05)
    assert paco_cifar_lr(320) == pytest.approx(0.05)
    assert paco_cifar_lr(321) == pytest.approx(0.005)
    assert paco_cifar_lr(360) == pytest.approx(0.005)
    assert paco_cifar_lr(361) == pytest.approx(0.0005)
    assert paco_cifar_lr(399) == pytest.approx(0.0005)


def test_paco_cosine() -> None:
    lr, epochs = 0.02, 400
    assert paco_cosine_lr(0, lr, epochs) == pytest.approx(0.002)
    assert paco_cosine_lr(9, lr, epochs) == pytest.approx(0.02)
    assert paco_cosine_lr(10, lr, epochs) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 391)))
    assert paco_cosine_lr(399, lr, epochs) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 390 / 391)))


def test_cosine_matches_torch_cosine_annealing() -> None:
    epochs, base = 7, 0.2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    for epoch in range(epochs):
        assert cosine_lr(epoch, base, epochs) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()  # stepped after each epoch
    assert cosine_lr(0, 1.0, 10, warmup=2) == pytest.approx(0.5)
    assert cosine_lr(2, 1.0, 10, warmup=2) == pytest.approx(1.0)
    assert cosine_lr(6, 1.0, 10, warmup=2, eta_min=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_cosine_classifier_balancing_quirk() -> None:
    epochs = 90
    # Epoch k (0-based) uses step k+1: the first epoch is already below the base lr, the last is 0.
    assert cosine_lr_classifier_balancing(0, 0.2, epochs) == pytest.approx(0.2 * (1 + math.cos(math.pi / 90)) / 2)
    assert cosine_lr_classifier_balancing(89, 0.2, epochs) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr_classifier_balancing(44, 0.2, epochs) == pytest.approx(0.1)


def test_step_lr() -> None:
    assert [step_lr(e, 1.0, milestones=(2, 4)) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_rho_step_cifar_and_imagenet() -> None:
    for epoch, rho in [(0, 0.05), (4, 0.05), (5, 0.1), (159, 0.1), (160, 0.5), (179, 0.5), (180, 0.6), (199, 0.6)]:
        assert rho_step(epoch) == rho, epoch
    imnet = dict(values=(0.05, 0.1, 0.5, 0.5), boundaries=(5, 60, 75))
    for epoch, rho in [(4, 0.05), (5, 0.1), (59, 0.1), (60, 0.5), (75, 0.5), (89, 0.5)]:
        assert rho_step(epoch, **imnet) == rho, epoch
    abcd = dict(values=(1.0, 2.0, 3.0, 4.0), boundaries=(5, 60, 75))
    assert [rho_step(e, **abcd) for e in (4, 5, 59, 60, 74, 75)] == [1.0, 2.0, 2.0, 3.0, 3.0, 4.0]


def test_rho_linear() -> None:
    assert rho_linear(0, 200) == pytest.approx(0.05)
    assert rho_linear(199, 200) == pytest.approx(0.8)
    assert rho_linear(1, 3, min_rho=0.0, max_rho=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("name", LR_SCHEDULES.names())
def test_every_lr_schedule_builds(name: str) -> None:
    sched = create_lr_schedule(name, base_lr=0.1, epochs=20)
    values = [sched(e) for e in range(20)]
    assert all(v >= 0 and math.isfinite(v) for v in values)


@pytest.mark.parametrize("name", RHO_SCHEDULES.names())
def test_every_rho_schedule_builds(name: str) -> None:
    sched = create_rho_schedule(name, rho=0.3, epochs=200)
    assert all(0 < sched(e) <= 0.8 for e in range(200))


def test_factories_bind_arguments() -> None:
    assert create_lr_schedule("ldam_drw", base_lr=0.1, epochs=200)(160) == pytest.approx(1e-3)
    assert create_lr_schedule("paco_cifar", base_lr=0.05, epochs=400)(10) == pytest.approx(0.055)
    assert create_lr_schedule("step", base_lr=1.0, epochs=9, milestones=(3,))(3) == pytest.approx(0.1)
    assert create_lr_schedule("cosine_classifier_balancing", base_lr=0.2, epochs=90)(89) == pytest.approx(0.0)
    assert create_rho_schedule("none", rho=0.8, epochs=200)(150) == 0.8
    assert create_rho_schedule("step", rho=0.8, epochs=90, boundaries=(5, 60, 75))(60) == 0.5
    assert create_rho_schedule("linear", rho=0.8, epochs=200)(199) == pytest.approx(0.8)


def test_factory_errors() -> None:
    with pytest.raises(UnknownNameError, match="ldam_drw"):
        create_lr_schedule("warp", base_lr=0.1, epochs=10)
    with pytest.raises(TypeError, match="valid arguments"):
        create_lr_schedule("cosine", base_lr=0.1, epochs=10, milestones=(3,))
    with pytest.raises(UnknownNameError, match="linear"):
        create_rho_schedule("cyclic", rho=0.1, epochs=10)
    with pytest.raises(ValueError, match="0-based"):
        ldam_drw_lr(-1)


def test_paco_cifar_without_warmup_is_the_step_schedule() -> None:
    # a shortened run (conf/teachers/fashion_lt.yaml: 5 epochs, drop after epoch 3) has no warm-up epoch left
    lrs = [paco_cifar_lr(e, base_lr=0.05, warmup=0, milestones=[3], factors=[0.1]) for e in range(5)]
    assert lrs == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.005])
