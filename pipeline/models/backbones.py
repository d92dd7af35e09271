"""Backbones, created through timm; this module registers the CIFAR ResNets of LDAM-DRW and small distilled ViTs.

ResNet-32 follows kaidic/LDAM-DRW ``models/resnet_cifar.py`` (METHODS.md §2.1): a 3x3 stem of 16 channels, three
stages of 16/32/64 channels with strides 1/2/2, option-A shortcuts (stride-2 subsampling and zero-padded channels),
global average pooling to 64-d, Kaiming-normal init of every conv and linear weight. ``cifar_resnet8`` is the same
network with one block per stage: the fast model for CPU runs.

The ``deit_lt_*_32`` models are timm's ``VisionTransformerDistilled`` (DeiT's CLS and DIST tokens, METHODS.md
§6.1) sized for 32×32 inputs on a CPU: patch 8 or 4 (16 or 64 patches + 2 prefix tokens), qkv bias, LayerNorm eps
1e-6, drop path 0.1 set by the recipe. Their patch, width and depth were chosen by measured training throughput on
this project's 2-core CPU (``VIT_SIZES``). The paper presets use timm's own ``deit_base_distilled_patch16_224`` at 224.

Every backbone is created with ``num_classes=0`` so that ``model(x)`` returns pooled features (B, num_features);
the classifier is a separate head (``pipeline.models.heads``).
"""

from __future__ import annotations

import logging

import timm
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from torch import Tensor, nn

from pipeline.registry import UnknownNameError

logger = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # option A: subsample spatially, zero-pad channels by planes // 4 on each side (no parameters)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def _shortcut(self, x: Tensor) -> Tensor:
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    """ResNet_s of LDAM-DRW with ``blocks`` basic blocks per stage (5 → ResNet-32)."""

    def __init__(self, blocks: int = 5, num_classes: int = 0, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 64
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))  # (B, 64, H/4, W/4)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))  # global average pool, (B, 64)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict:
    return dict(num_classes=10, input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, first_conv="stem.0",
                classifier="head", **kwargs)


def _vit_cfg(**kwargs: object) -> dict:
    # DeiT-LT normalises with the ImageNet statistics at every resolution (timm create_transform defaults, §6.3)
    return dict(num_classes=10, input_size=(3, 32, 32), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                interpolation="bicubic", first_conv="patch_embed.proj", classifier=("head", "head_dist"),
                fixed_input_size=True, **kwargs)


# timm reads the module-level ``default_cfgs`` of the registering module (ECOSYSTEM.md §6)
default_cfgs = generate_default_cfgs({
    "cifar_resnet8.untrained": _cfg(),
    "cifar_resnet20.untrained": _cfg(),
    "cifar_resnet32.untrained": _cfg(),
    "deit_lt_nano_patch8_32.untrained": _vit_cfg(),
    "deit_lt_nano_patch4_32.untrained": _vit_cfg(),
    "deit_lt_tiny_patch4_32.untrained": _vit_cfg(),
    "deit_lt_small_patch4_32.untrained": _vit_cfg(),
})

#: (patch_size, embed_dim, depth, num_heads) of the 32×32 distilled ViTs; measured training throughput on this
#: project's 2-core CPU (batch 64, forward + backward + AdamW, images/s): nano_patch8 4300, nano_patch4 1240,
#: tiny_patch4 300, small_patch4 ~80; cifar_resnet8 2700 for comparison.
VIT_SIZES = {"nano_patch8": (8, 64, 4, 4), "nano_patch4": (4, 64, 4, 4), "tiny_patch4": (4, 128, 6, 4),
             "small_patch4": (4, 192, 8, 6)}


def _create(variant: str, blocks: int, pretrained: bool, **kwargs: object) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, blocks=blocks, **kwargs)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet_s with one block per stage: the fast CPU model."""
    return _create("cifar_resnet8", 1, pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    return _create("cifar_resnet20", 3, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet-32 of LDAM-DRW, PaCo, Saddle-LongTail and DeiT-LT's CIFAR teachers (METHODS.md §2.1)."""
    return _create("cifar_resnet32", 5, pretrained, **kwargs)


def _create_vit(size: str, pretrained: bool, **kwargs: object) -> VisionTransformerDistilled:
    patch, dim, depth, heads = VIT_SIZES[size]
    args = dict(img_size=32, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
                qkv_bias=True)
    return build_model_with_cfg(VisionTransformerDistilled, f"deit_lt_{size}_32", pretrained, **{**args, **kwargs})


@register_model
def deit_lt_nano_patch8_32(pretrained: bool = False, **kwargs: object) -> VisionTransformerDistilled:
    """Distilled ViT for 32×32 inputs: patch 8 (16 patches), width 64, depth 4, 4 heads (the default run's student)."""
    return _create_vit("nano_patch8", pretrained, **kwargs)


@register_model
def deit_lt_nano_patch4_32(pretrained: bool = False, **kwargs: object) -> VisionTransformerDistilled:
    """Distilled ViT for 32×32 inputs: patch 4 (64 patches), width 64, depth 4, 4 heads."""
    return _create_vit("nano_patch4", pretrained, **kwargs)


@register_model
def deit_lt_tiny_patch4_32(pretrained: bool = False, **kwargs: object) -> VisionTransformerDistilled:
    """Distilled ViT for 32×32 inputs: patch 4, width 128, depth 6, 4 heads."""
    return _create_vit("tiny_patch4", pretrained, **kwargs)


@register_model
def deit_lt_small_patch4_32(pretrained: bool = False, **kwargs: object) -> VisionTransformerDistilled:
    """Distilled ViT for 32×32 inputs: patch 4, width 192, depth 8, 6 heads."""
    return _create_vit("small_patch4", pretrained, **kwargs)


def create_backbone(name: str, *, pretrained: bool = False, checkpoint_file: str | None = None, **kwargs: object):
    """A timm model without classifier (``num_classes=0``): ``model(x)`` gives (B, model.num_features).

    Args:
        name: any timm model name, including the ones registered here.
        pretrained: load pretrained weights (from the hub, or from ``checkpoint_file`` when given).
        checkpoint_file: a local weights file, loaded through timm's ``pretrained_cfg_overlay``.
    """
    if not timm.is_model(name):
        raise UnknownNameError(
            f"unknown backbone {name!r}; registered here: cifar_resnet8, cifar_resnet20, cifar_resnet32; "
            f"or any of timm's {len(timm.list_models())} models (timm.list_models())"
        )
    extra: dict = {}
    if checkpoint_file:
        pretrained, extra["pretrained_cfg_overlay"] = True, {"file": checkpoint_file}
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra, **kwargs)
