"""Unit tests of CE, focal, class-balanced/DRW weights, balanced softmax, logit adjustment and LDAM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    LOSSES,
    BalancedSoftmaxLoss,
    CrossEntropyLoss,
    DRWSchedule,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    class_balanced_weights,
    class_weight_schedule,
    create_loss,
    drw_weights,
    drw_weights_at,
    logit_adjust_posthoc,
)
from pipeline.registry import UnknownNameError

CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CIFAR10_IF100_DRW = [0.050611, 0.0769, 0.121134, 0.195037, 0.318805, 0.52459, 0.868349, 1.442627, 2.409223, 3.992724]


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 0, 3])
    return logits, target


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample −log softmax by hand, (B,)."""
    rows = []
    for i in range(logits.shape[0]):
        z = logits[i]
        rows.append(-(z[target[i]] - torch.log(torch.exp(z).sum())))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------ weights


def test_cb_weights_cifar10_reference_values() -> None:
    w = drw_weights(CIFAR10_IF100)
    assert torch.allclose(w, torch.tensor(CIFAR10_IF100_DRW), atol=1e-6)
    assert w.sum().item() == pytest.approx(10.0, abs=1e-5)
    assert torch.equal(class_balanced_weights(CIFAR10_IF100), w)


def test_cb_weights_beta_zero_all_ones_and_hand_formula() -> None:
    assert torch.equal(drw_weights([10, 5, 1], beta=0.0), torch.ones(3))
    beta = 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in (10, 5, 1)]
    expected = torch.tensor([r / sum(raw) * 3 for r in raw])
    assert torch.allclose(class_balanced_weights([10, 5, 1], beta=beta), expected, atol=1e-6)


@pytest.mark.parametrize("bad", [[], [3, -1], [[1, 2]]])
def test_cb_weights_reject_bad_counts(bad: list) -> None:
    with pytest.raises(ValueError):
        class_balanced_weights(bad)


def test_drw_switch_epoch() -> None:
    assert torch.equal(drw_weights_at(0, CIFAR10_IF100, switch_epoch=160), torch.ones(10))
    assert torch.equal(drw_weights_at(159, CIFAR10_IF100, switch_epoch=160), torch.ones(10))
    assert torch.allclose(
        drw_weights_at(160, CIFAR10_IF100, switch_epoch=160), torch.tensor(CIFAR10_IF100_DRW), atol=1e-6
    )
    assert torch.allclose(drw_weights_at(199, CIFAR10_IF100, switch_epoch=160), drw_weights(CIFAR10_IF100))
    sched = DRWSchedule(CIFAR10_IF100, switch_epoch=60)
    assert torch.equal(sched(59), torch.ones(10)) and torch.equal(sched(60), drw_weights(CIFAR10_IF100))


def test_class_weight_rules() -> None:
    assert class_weight_schedule("none", 170, CIFAR10_IF100) is None
    assert torch.equal(class_weight_schedule("reweight", 0, CIFAR10_IF100), drw_weights(CIFAR10_IF100))
    assert torch.equal(class_weight_schedule("DRW", 0, CIFAR10_IF100), torch.ones(10))
    assert DRWSchedule(CIFAR10_IF100, rule="none")(200) is None
    with pytest.raises(ValueError, match="valid rules"):
        class_weight_schedule("resample", 0, CIFAR10_IF100)


# ------------------------------------------------------------------------------------------------ CE / focal


def test_ce_matches_hand_and_weighted_mean(batch) -> None:
    logits, target = batch
    nll = _nll(logits, target)
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(nll.mean().item(), rel=1e-12)
    w = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    wy = w[target]
    expected = (wy * nll).sum() / wy.sum()
    assert CrossEntropyLoss()(logits, target, weight=w).item() == pytest.approx(expected.item(), rel=1e-12)


def test_focal_hand_computation(batch) -> None:
    logits, target = batch
    w = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    ce = w[target] * _nll(logits, target)
    p = torch.exp(-ce)  # official quirk: not the true probability when weighted
    expected = ((1 - p) ** 2.0 * ce).mean()  # plain mean, not weight-normalised
    assert FocalLoss(gamma=2.0)(logits, target, weight=w).item() == pytest.approx(expected.item(), rel=1e-12)
    ce_u = _nll(logits, target)
    expected_u = ((1 - torch.exp(-ce_u)) * ce_u).mean()
    assert FocalLoss()(logits, target).item() == pytest.approx(expected_u.item(), rel=1e-12)


def test_focal_gamma0_is_ce(batch) -> None:
    logits, target = batch
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))


# ------------------------------------------------------------------------------------------------ BS / LA


def test_balanced_softmax_hand_and_equal_counts(batch) -> None:
    logits, target = batch
    counts = [8, 4, 2, 1]
    expected = _nll(logits + torch.log(torch.tensor(counts, dtype=torch.float64)), target).mean()
    assert BalancedSoftmaxLoss(counts)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(BalancedSoftmaxLoss([7, 7, 7, 7])(logits, target), F.cross_entropy(logits, target))


def test_balanced_softmax_zero_count_gives_minus_inf() -> None:
    loss = BalancedSoftmaxLoss([3, 0])
    assert math.isinf(loss.log_counts[1].item()) and loss.log_counts[1].item() < 0
    # A zero-count class drops out of the normaliser: a 2-class problem becomes a 1-class one.
    assert loss(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-7)


def test_logit_adjusted_hand_tau0_and_bs_equivalence(batch) -> None:
    logits, target = batch
    counts = [8, 4, 2, 1]
    prior = torch.tensor(counts, dtype=torch.float64) / 15
    tau = 0.5
    expected = _nll(logits + torch.log(prior**tau + 1e-12), target).mean()
    assert LogitAdjustedLoss(counts, tau=tau)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(LogitAdjustedLoss(counts, tau=0.0)(logits, target), F.cross_entropy(logits, target))
    # log π and log n differ by a per-row constant: same loss at tau 1 (up to the 1e-12 epsilon).
    la = LogitAdjustedLoss(counts)(logits, target)
    assert torch.allclose(la, BalancedSoftmaxLoss(counts)(logits, target), atol=1e-6)


def test_logit_adjust_posthoc() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0]])
    counts = [6, 3, 1]
    out = logit_adjust_posthoc(z, counts, tau=1.0)
    expected = z - torch.log(torch.tensor([0.6, 0.3, 0.1]) + 1e-12)
    assert torch.allclose(out, expected)
    assert torch.allclose(logit_adjust_posthoc(z, counts, tau=0.0), z - math.log(1 + 1e-12))


# ------------------------------------------------------------------------------------------------ LDAM


def test_ldam_margins() -> None:
    loss = LDAMLoss(CIFAR10_IF100, max_margin=0.5)
    assert loss.margins[-1].item() == pytest.approx(0.5)  # rarest class gets max_m exactly
    expected = 0.5 * (50 / torch.tensor(CIFAR10_IF100, dtype=torch.float64)) ** 0.25
    assert torch.allclose(loss.margins.double(), expected, atol=1e-7)
    assert "margins" not in loss.state_dict()


def test_ldam_hand_computation_and_weighted_mean(batch) -> None:
    logits, target = batch
    counts = [16, 81, 1, 256]
    loss = LDAMLoss(counts, max_margin=0.5, scale=30.0)
    m = 0.5 * torch.tensor([(1 / c) ** 0.25 for c in counts], dtype=torch.float64)  # n_min = 1
    adjusted = logits.clone()
    for i, y in enumerate(target.tolist()):
        adjusted[i, y] -= m[y]  # margin on the true class only, then scale
    nll = _nll(30.0 * adjusted, target)
    assert loss(logits, target).item() == pytest.approx(nll.mean().item(), rel=1e-6)
    w = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    expected = (w[target] * nll).sum() / w[target].sum()
    assert loss(logits, target, weight=w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ldam_degenerate_is_ce(batch) -> None:
    logits, target = batch
    assert torch.allclose(
        LDAMLoss([5, 4, 3, 2], max_margin=0.0, scale=1.0)(logits, target), F.cross_entropy(logits, target)
    )


def test_ldam_rejects_zero_count() -> None:
    with pytest.raises(ValueError, match="zero training samples"):
        LDAMLoss([3, 0, 2])


# ------------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", LOSSES.names())
def test_registry_every_loss_builds_and_reduces(name: str, batch) -> None:
    logits, target = batch
    loss = create_loss(name, class_counts=[8, 4, 2, 1])
    value = loss(logits.float(), target)
    weighted = loss(logits.float(), target, weight=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(weighted)
    assert value.item() != pytest.approx(weighted.item())  # the weight path changes the loss


def test_registry_names_and_unknown() -> None:
    assert {"ce", "focal", "balanced_softmax", "logit_adjusted", "ldam"} <= set(LOSSES.names())
    with pytest.raises(UnknownNameError, match="ldam"):
        create_loss("nope", class_counts=[1, 2])
    assert create_loss("focal", class_counts=[1, 2], gamma=2.0).gamma == 2.0


def test_losses_backprop_and_buffers_follow_dtype(batch) -> None:
    logits, target = batch
    for name in LOSSES.names():
        z = logits.clone().requires_grad_(True)
        create_loss(name, class_counts=[8, 4, 2, 1]).double()(z, target).backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
