"""Classifier heads: linear, LDAM's NormedLinear, CBD's cosine layer, LWS, τ-normalised and learnable-τ heads.

References: kaidic/LDAM-DRW ``models/resnet_cifar.py: NormedLinear`` (METHODS.md §2.1); google-research
class_balanced_distillation ``resnet.py: CosineLayer`` (§7.1); facebookresearch/classifier-balancing
``tau_norm.py`` (§5.4) and ``models/TauNormClassifier.py`` (LWS, §5.5); Kang et al., ICLR 2020, B.5 (learnable τ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


def tau_normalize(weight: Tensor, tau: float | Tensor) -> Tensor:
    """Row-wise τ-normalisation ``w_i / ||w_i||_2^τ`` of a (C, D) classifier weight (§5.4).

    τ = 0 returns the weight unchanged; τ = 1 gives unit-norm rows.
    """
    return weight / weight.norm(p=2, dim=1, keepdim=True).pow(tau)


@HEADS.register("linear")
class LinearHead(nn.Linear):
    """``nn.Linear`` with bias (the joint classifier of classifier-balancing, ERM, PaCo's centers).

    Args:
        init: 'default' (PyTorch's kaiming-uniform), 'kaiming_normal' (LDAM-DRW's init of every Linear) or
            'trunc_normal' (DeiT's heads: truncated normal std 0.02, zero bias).
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, init: str = "default") -> None:
        super().__init__(in_features, num_classes, bias=bias)
        if init == "kaiming_normal":
            nn.init.kaiming_normal_(self.weight)
        elif init == "trunc_normal":
            nn.init.trunc_normal_(self.weight, std=0.02)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        elif init != "default":
            raise ValueError(f"unknown linear init {init!r}; valid: default, kaiming_normal, trunc_normal")


@HEADS.register("normed")
class NormedLinear(nn.Module):
    """LDAM's cosine classifier: ``normalize(x) @ normalize(W, dim=0)``, logits in [-1, 1] (§2.1).

    The weight has shape (in_features, num_classes), transposed relative to ``nn.Linear``, and no bias. Its init:
    uniform(-1, 1), then every class column renormalised to norm 1. LDAM applies its scale ``s`` in the loss, so
    ``scale`` stays 1 here for LDAM.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, num_classes).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0))  # (B, C)

    @property
    def class_weight(self) -> Tensor:
        return self.weight.t()


@HEADS.register("cosine")
class CosineHead(nn.Module):
    """CBD's ``CosineLayer``: ``σ · normalize(x) @ normalize(W, axis 0)`` with a fixed σ = 20 (§7.1).

    W has shape (in_features, num_classes) with Glorot-uniform init; σ is a buffer, never trained.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0))  # (B, C)

    @property
    def class_weight(self) -> Tensor:
        return self.weight.t()


@HEADS.register("tau_norm")
class TauNormHead(nn.Module):
    """Logits ``x · τnorm(W)ᵀ`` without bias (the bias of the joint classifier is dropped, §5.4).

    With ``learnable=True`` τ is a parameter (Kang et al. B.5: trained on the training set with class-balanced
    sampling, the backbone and the weight frozen).
    """

    def __init__(self, in_features: int, num_classes: int, tau: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, in_features))
        t = torch.tensor(float(tau))
        if learnable:
            self.tau = nn.Parameter(t)
        else:
            self.register_buffer("tau", t)

    def forward(self, x: Tensor) -> Tensor:
        return x @ tau_normalize(self.weight, self.tau).t()

    @property
    def class_weight(self) -> Tensor:
        return tau_normalize(self.weight, self.tau)


@HEADS.register("lws")
class LWSHead(nn.Module):
    """Learnable weight scaling: ``(W x + b) ⊙ s`` with W, b frozen and s initialised to ones (§5.5).

    As in the official ``TauNormClassifier`` the bias is kept and scaled too (the paper's formula has none).
    ``base`` is the spec of the frozen head (default a linear layer with bias); a cosine head works the same way.
    """

    def __init__(self, in_features: int, num_classes: int, base: dict | None = None) -> None:
        super().__init__()
        base = dict(base or {"name": "linear"})
        self.fc = HEADS.create(base.pop("name"), in_features=in_features, num_classes=num_classes, **base)
        self.fc.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scales  # (B, C)

    @property
    def class_weight(self) -> Tensor:
        return class_weight(self.fc) * self.scales[:, None]


@HEADS.register("ncm")
class NCMHead(nn.Module):
    """Nearest class mean classifier over stored centroids (classifier-balancing ``KNNClassifier``, §5.6).

    feat_type: 'un' (raw), 'l2n' (L2-normalised), 'cl2n' (centred by the train mean, then L2-normalised);
    dist_type: 'l2' (logit = -squared distance) or 'cos' (x·c / D). Centroids are not renormalised.
    """

    def __init__(self, in_features: int, num_classes: int, feat_type: str = "cl2n", dist_type: str = "l2") -> None:
        super().__init__()
        if feat_type not in ("un", "l2n", "cl2n") or dist_type not in ("l2", "cos"):
            raise ValueError(f"NCM feat_type {feat_type!r} / dist_type {dist_type!r}; valid: un|l2n|cl2n, l2|cos")
        self.feat_type, self.dist_type = feat_type, dist_type
        self.register_buffer("centroids", torch.zeros(num_classes, in_features))
        self.register_buffer("featmean", torch.zeros(in_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.feat_type == "cl2n":
            x = x - self.featmean
        if self.feat_type in ("l2n", "cl2n"):
            x = F.normalize(x, dim=1)
        c = self.centroids
        if self.dist_type == "cos":
            return x @ c.t() / x.shape[1]
        return -(x.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1)[None] - 2 * x @ c.t())  # (B, C)


def create_head(name: str, *, in_features: int, num_classes: int, **kwargs: object) -> nn.Module:
    """A head from the registry: 'linear', 'normed', 'cosine', 'tau_norm', 'lws', 'ncm'."""
    return HEADS.create(name, in_features=in_features, num_classes=num_classes, **kwargs)


def class_weight(head: nn.Module) -> Tensor:
    """The (C, D) per-class weight of a head (what τ-normalisation and weight-norm plots look at)."""
    if hasattr(head, "class_weight"):
        return head.class_weight
    if isinstance(head, NCMHead):
        return head.centroids
    return head.weight


