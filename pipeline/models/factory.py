"""Creating a backbone by name: the CIFAR ResNets in plain PyTorch, every other name through timm (imported then).

A teacher that trains ``cifar_resnet32`` thus never imports timm (3+ s of a stage's start-up); ``deit_lt_*_32``, the
paper presets' timm models and pretrained weights go through timm, with this project's models registered with it
(``pipeline.models.backbones``).
"""

from __future__ import annotations

from torch import nn

from pipeline.models.cifar_resnet import CIFAR_RESNET_BLOCKS, create_cifar_resnet
from pipeline.registry import UnknownNameError


def _timm():
    import timm

    from pipeline.models import backbones  # noqa: F401  (registers this project's models with timm)

    return timm


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a CIFAR ResNet of this project or any timm model (then timm is imported)."""
    return name in CIFAR_RESNET_BLOCKS or _timm().is_model(name)


def create_backbone(name: str, *, pretrained: bool = False, checkpoint_file: str | None = None,
                    **kwargs: object) -> nn.Module:
    """A backbone without classifier (``num_classes=0``): ``model(x)`` gives (B, model.num_features).

    Args:
        name: ``cifar_resnet8`` / ``20`` / ``32``, or any timm model name (``deit_lt_*_32`` are registered here).
        pretrained: load pretrained weights (from the hub, or from ``checkpoint_file`` when given), through timm.
        checkpoint_file: a local weights file, loaded through timm's ``pretrained_cfg_overlay``.
    """
    if name in CIFAR_RESNET_BLOCKS and not pretrained and not checkpoint_file:
        return create_cifar_resnet(name, **kwargs)
    timm = _timm()
    if not timm.is_model(name):
        raise UnknownNameError(
            f"unknown backbone {name!r}; registered here: {', '.join(CIFAR_RESNET_BLOCKS)}; "
            f"or any of timm's {len(timm.list_models())} models (timm.list_models())"
        )
    extra: dict = {}
    if checkpoint_file:
        pretrained, extra["pretrained_cfg_overlay"] = True, {"file": checkpoint_file}
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra, **kwargs)
