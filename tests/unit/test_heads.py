"""Classifier heads (METHODS.md §2.1, §5.4-5.6, §7.1, §9 items 5, 10-12, 14) against hand-computed logits.

Degenerate equivalences (STYLE.md principle 10): τ-norm with τ = 0 is the biasless joint classifier; LWS with unit
scales is the joint classifier with bias; the NCM head equals the post-hoc ``ncm_logits``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluate.posthoc import ncm_centroids, ncm_logits
from pipeline.models.heads import (
    HEADS,
    CosineHead,
    LinearHead,
    LWSHead,
    NCMHead,
    NormedLinear,
    TauNormHead,
    class_weight,
    create_head,
    tau_normalize,
)

D, C, B = 8, 5, 6


def _x(seed: int = 0, n: int = B) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _cos(x: torch.Tensor, w_in_out: torch.Tensor) -> torch.Tensor:
    """(B, C) cosines between rows of x and columns of W (in, out), computed entry by entry."""
    return torch.stack([torch.stack([F.cosine_similarity(xi, wc, dim=0, eps=0) for wc in w_in_out.t()]) for xi in x])


def test_normed_linear_shape_range_and_init() -> None:
    torch.manual_seed(0)
    head = NormedLinear(D, C)
    assert head.weight.shape == (D, C)  # (in, out): transposed relative to nn.Linear
    assert [n for n, _ in head.named_parameters()] == ["weight"]  # no bias
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(C))  # every class column has norm 1
    z = head(_x() * 100)
    assert z.shape == (B, C) and z.min() >= -1 and z.max() <= 1
    torch.testing.assert_close(z, _cos(_x() * 100, head.weight), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(class_weight(head), head.weight.t())


def test_cosine_head_fixed_scale_20() -> None:
    torch.manual_seed(0)
    head = create_head("cosine", in_features=D, num_classes=C)
    assert isinstance(head, CosineHead) and head.weight.shape == (D, C)
    assert "scale" in dict(head.named_buffers()) and float(head.scale) == 20.0
    assert [n for n, _ in head.named_parameters()] == ["weight"]  # σ is not trained
    x = _x()
    z = head(x)
    torch.testing.assert_close(z, 20.0 * _cos(x, head.weight), rtol=1e-5, atol=1e-5)
    assert z.abs().max() <= 20.0 + 1e-5
    # Glorot uniform: |w| <= sqrt(6 / (in + out))
    assert head.weight.abs().max() <= (6 / (D + C)) ** 0.5


def test_tau_normalize() -> None:
    w = torch.randn(C, D) * 3
    assert torch.equal(tau_normalize(w, 0.0), w)
    torch.testing.assert_close(tau_normalize(w, 1.0).norm(dim=1), torch.ones(C))
    torch.testing.assert_close(tau_normalize(w, 0.5), w / w.norm(dim=1, keepdim=True).sqrt())


def test_tau_norm_head_at_zero_is_biasless_joint_logits() -> None:
    torch.manual_seed(0)
    joint = LinearHead(D, C)
    x = _x()
    head = TauNormHead(D, C, tau=0.0)
    head.weight.copy_(joint.weight.detach())
    assert list(head.parameters()) == []  # τ and W are buffers unless τ is learnable
    torch.testing.assert_close(head(x), x @ joint.weight.detach().t())
    torch.testing.assert_close(head(x), joint(x).detach() - joint.bias.detach())  # the bias is dropped
    head1 = TauNormHead(D, C, tau=1.0)
    head1.weight.copy_(joint.weight.detach())
    w_unit = joint.weight.detach() / joint.weight.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(head1(x), x @ w_unit.t())  # τ = 1: cosine logits times ||x||
    learn = TauNormHead(D, C, tau=1.0, learnable=True)
    assert [n for n, _ in learn.named_parameters()] == ["tau"]


def test_lws_with_unit_scales_is_the_joint_classifier() -> None:
    torch.manual_seed(0)
    joint = LinearHead(D, C)
    head = create_head("lws", in_features=D, num_classes=C)
    assert isinstance(head, LWSHead) and isinstance(head.fc, LinearHead) and head.fc.bias is not None
    head.fc.load_state_dict(joint.state_dict())
    assert torch.equal(head.scales.detach(), torch.ones(C))
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["scales"]  # W and b frozen
    x = _x()
    assert torch.equal(head(x), joint(x))
    with torch.no_grad():
        head.scales.copy_(torch.arange(1.0, C + 1))
    torch.testing.assert_close(head(x), joint(x) * torch.arange(1.0, C + 1))  # the bias is scaled too
    torch.testing.assert_close(class_weight(head), joint.weight * torch.arange(1.0, C + 1)[:, None])


def test_lws_over_a_cosine_base() -> None:
    torch.manual_seed(0)
    base = CosineHead(D, C)
    head = create_head("lws", in_features=D, num_classes=C, base={"name": "cosine"})
    assert isinstance(head.fc, CosineHead)
    head.fc.load_state_dict(base.state_dict())
    x = _x()
    assert torch.equal(head(x), base(x))
    assert not head.fc.weight.requires_grad


@pytest.mark.parametrize("feat_type", ["un", "l2n", "cl2n"])
@pytest.mark.parametrize("dist_type", ["l2", "cos"])
def test_ncm_head_equals_posthoc_ncm_logits(feat_type: str, dist_type: str) -> None:
    train = _x(1, n=40) + 2.0
    labels = torch.arange(40) % C
    centroids, featmean = ncm_centroids(train.numpy(), labels.numpy(), C, feat_type)
    head = create_head("ncm", in_features=D, num_classes=C, feat_type=feat_type, dist_type=dist_type)
    assert isinstance(head, NCMHead) and list(head.parameters()) == []
    head.centroids.copy_(torch.as_tensor(centroids))
    head.featmean.copy_(torch.as_tensor(featmean))
    x = _x(2) + 2.0
    expected = ncm_logits(x.numpy(), centroids, featmean, feat_type, dist_type)
    torch.testing.assert_close(head(x), torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    if dist_type == "l2":  # the negative squared distance to each centroid
        z = x - torch.as_tensor(featmean) if feat_type == "cl2n" else x
        z = F.normalize(z, dim=1) if feat_type != "un" else z
        torch.testing.assert_close(head(x), -(torch.cdist(z, torch.as_tensor(centroids)) ** 2), rtol=1e-4, atol=1e-4)


def test_ncm_head_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="valid"):
        NCMHead(D, C, feat_type="zscore")
    with pytest.raises(ValueError, match="valid"):
        NCMHead(D, C, dist_type="manhattan")


def test_linear_head_init_options() -> None:
    assert LinearHead(D, C, init="kaiming_normal").bias is not None
    with pytest.raises(ValueError, match="valid: default, kaiming_normal"):
        LinearHead(D, C, init="xavier")


@pytest.mark.parametrize("name", HEADS.names())
def test_every_registered_head_maps_features_to_logits(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, in_features=D, num_classes=C)
    if name == "tau_norm":  # weights are loaded from the joint classifier before use
        head.weight.copy_(torch.randn(C, D))
    z = head(_x())
    assert z.shape == (B, C) and torch.isfinite(z).all()
    if name != "ncm":  # NCM has centroids, not a classifier weight
        assert class_weight(head).shape == (C, D)
