"""Unit tests of PaCoLoss against an independent loop-based reference of METHODS.md §4.2.

The log prior is a float32 buffer (the default dtype), so float64 comparisons use rel=1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import PaCoLoss


def _reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    counts: list[int],
    alpha: float,
    temperature: float,
    beta: float = 1.0,
    gamma: float = 1.0,
    base_temperature: float | None = None,
    supt: float = 1.0,
) -> float:
    """Per-anchor loop in plain Python floats: one softmax over the C centres and every contrast column but self."""
    base_temperature = temperature if base_temperature is None else base_temperature
    b, c = logits.shape
    n = features.shape[0]
    total = sum(counts)
    losses = []
    for i in range(b):
        centre = [(logits[i, j].item() + math.log(counts[j] / total + 1e-9)) / supt for j in range(c)]
        contrast = [float(features[i] @ features[j]) / temperature for j in range(n)]
        row_max = max(centre + contrast)
        centre = [v - row_max for v in centre]
        contrast = [v - row_max for v in contrast]
        denom = sum(math.exp(v) for v in centre) + sum(gamma * math.exp(contrast[j]) for j in range(n) if j != i)
        log_denom = math.log(denom + 1e-12)
        num, norm = 0.0, 0.0
        y = int(labels[i])
        num += beta * (centre[y] - log_denom)
        norm += beta
        for j in range(n):
            if j != i and int(labels[j]) == y:
                num += alpha * (contrast[j] - log_denom)
                norm += alpha
        losses.append(-(temperature / base_temperature) * num / norm)
    return sum(losses) / b


def _toy(b: int = 3, k: int = 4, c: int = 3, dim: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels_q = torch.randint(0, c, (b,), generator=gen)
    queue_labels = torch.randint(0, c, (k,), generator=gen)
    features = F.normalize(torch.randn(2 * b + k, dim, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.cat([labels_q, labels_q, queue_labels])
    logits = torch.randn(b, c, generator=gen, dtype=torch.float64)
    return features, labels, logits


@pytest.mark.parametrize(
    "kw",
    [
        dict(alpha=0.05, temperature=0.2),
        dict(alpha=0.01, temperature=0.05, beta=1.0, gamma=1.0),
        dict(alpha=0.3, temperature=0.1, beta=0.7, gamma=0.5, base_temperature=0.07, supt=2.0),
    ],
)
def test_matches_loop_reference(kw: dict) -> None:
    counts = [50, 10, 2]
    features, labels, logits = _toy()
    got = PaCoLoss(counts, **kw).double()(features, labels, logits).item()
    assert got == pytest.approx(_reference(features, labels, logits, counts, **kw), rel=1e-6)


def test_hand_computed_tiny_batch() -> None:
    """B=1, K=0, C=2: columns are [centre0, centre1, q (self), k]; positives: centre y and the key."""
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # q·k = 0.6
    labels = torch.tensor([0, 0])
    logits = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    counts = [3, 1]
    alpha, t = 0.5, 0.5
    c0 = 2.0 + math.log(0.75 + 1e-9)
    c1 = 1.0 + math.log(0.25 + 1e-9)
    key = 0.6 / t  # self column (1/T = 2) is excluded from the denominator
    log_denom = math.log(math.exp(c0) + math.exp(c1) + math.exp(key))  # the max shift cancels exactly
    expected = -((c0 - log_denom) + alpha * (key - log_denom)) / (1.0 + alpha)
    got = PaCoLoss(counts, alpha=alpha, temperature=t).double()(features, labels, logits).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_self_column_excluded_from_positives_and_denominator() -> None:
    """The anchor's own column (q·q/T = 1, same label) is neither a positive nor in the denominator."""
    counts = [5, 5]
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[0.3, -0.2]], dtype=torch.float64)  # B = 1, K = 0
    # Anchor label 0, key label 1: the only positive is the centre; denominator = 2 centres + key (q·k = 0).
    loss = PaCoLoss(counts, alpha=1.0, temperature=1.0).double()(features, labels, logits).item()
    log_prior = math.log(0.5 + 1e-9)
    z = [0.3 + log_prior, -0.2 + log_prior, 0.0]
    expected = -(z[0] - math.log(sum(math.exp(v) for v in z)))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_positive_key_counted_and_normaliser() -> None:
    """With the key as the only contrastive positive, the normaliser is β + α·1."""
    features, labels, logits = _toy(b=2, k=0, c=2, seed=3)
    labels = torch.tensor([0, 1, 0, 1])  # each anchor's only same-label feature is its own key
    counts = [4, 4]
    beta, alpha = 2.0, 3.0
    loss = PaCoLoss(counts, alpha=alpha, temperature=0.5, beta=beta).double()(features, labels, logits).item()
    assert loss == pytest.approx(_reference(features, labels, logits, counts, alpha, 0.5, beta=beta), rel=1e-6)
    # Explicit: anchor 0's positives are the centre (β) and column B+0 (α).
    t = 0.5
    row = []
    for i in range(2):
        cen = [logits[i, j].item() + math.log(0.5 + 1e-9) for j in range(2)]
        con = [float(features[i] @ features[j]) / t for j in range(4)]
        log_denom = math.log(sum(map(math.exp, cen)) + sum(math.exp(con[j]) for j in range(4) if j != i))
        y = int(labels[i])
        row.append(-(beta * (cen[y] - log_denom) + alpha * (con[2 + i] - log_denom)) / (beta + alpha))
    assert loss == pytest.approx(sum(row) / 2, rel=1e-6)


def test_log_prior_epsilon_and_temperature_only_on_contrast() -> None:
    """A zero-count class gets log(1e-9), not -inf; T does not scale the centre logits."""
    loss = PaCoLoss([1, 0], alpha=0.1, temperature=0.2)
    assert loss.log_prior[1].item() == pytest.approx(math.log(1e-9), rel=1e-6)
    assert loss.log_prior[0].item() == pytest.approx(math.log(1 + 1e-9), abs=1e-7)
    # With alpha = 0 and gamma = 0 only the centre term remains: CE(z + log π) whatever T is.
    features, labels, logits = _toy(b=3, k=2, c=3, seed=1)
    counts = [6, 3, 1]
    expected = F.cross_entropy(logits + torch.log(torch.tensor(counts, dtype=torch.float64) / 10 + 1e-9), labels[:3])
    # (T ≥ 1 keeps the contrast columns ≤ 1/T, so the 1e-12 in the log stays negligible after the max shift.)
    for t in (1.0, 2.0, 7.0):
        got = PaCoLoss(counts, alpha=0.0, temperature=t, gamma=0.0).double()(features, labels, logits)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_queue_size_inferred_and_gradients() -> None:
    features, labels, logits = _toy(b=4, k=8, c=3, dim=6, seed=2)
    features = features.clone().requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    loss = PaCoLoss([9, 3, 1], alpha=0.05, temperature=0.2).double()(features, labels, logits)
    loss.backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="2B\\+K"):
        PaCoLoss([9, 3, 1], alpha=0.05, temperature=0.2)(features[:5].detach().float(), labels[:5], logits.float())
