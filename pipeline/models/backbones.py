"""The timm side of the backbones: registers the CIFAR ResNets of LDAM-DRW and small distilled ViTs with timm.

Importing this module imports timm (3+ s): :func:`pipeline.models.factory.create_backbone` imports it only for a
backbone that needs timm, never for the CIFAR ResNets (``pipeline.models.cifar_resnet``), which are registered here
as well so that ``timm.create_model("cifar_resnet32")`` and pretrained files work.

The ``deit_lt_*_32`` models are timm's ``VisionTransformerDistilled`` (DeiT's CLS and DIST tokens, METHODS.md
§6.1) sized for 32×32 inputs on a CPU: patch 8 or 4 (16 or 64 patches + 2 prefix tokens), qkv bias, LayerNorm eps
1e-6, drop path 0.1 set by the recipe. Their patch, width and depth were chosen by measured training throughput on
this project's 2-core CPU (``VIT_SIZES``). The paper presets use timm's own ``deit_base_distilled_patch16_224`` at 224.

Every backbone is created with ``num_classes=0`` so that ``model(x)`` returns pooled features (B, num_features);
the classifier is a separate head (``pipeline.models.heads``).
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled

from pipeline.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD, CifarResNet, _BasicBlock  # noqa: F401  (re-exported)
from pipeline.models.factory import create_backbone, is_backbone  # noqa: F401  (re-exported)


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
