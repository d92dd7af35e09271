"""The CIFAR ResNets of LDAM-DRW in plain PyTorch: built without timm, so a stage that trains one never imports it.

ResNet-32 follows kaidic/LDAM-DRW ``models/resnet_cifar.py`` (METHODS.md §2.1): a 3x3 stem of 16 channels, three
stages of 16/32/64 channels with strides 1/2/2, option-A shortcuts (stride-2 subsampling and zero-padded channels),
global average pooling to 64-d, Kaiming-normal init of every conv and linear weight. ``cifar_resnet8`` is the same
network with one block per stage: the fast model for CPU runs. ``pipeline.models.backbones`` registers the same
classes with timm (``timm.create_model("cifar_resnet32")``, pretrained files); both paths give identical weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

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


#: blocks per stage of each registered CIFAR ResNet
CIFAR_RESNET_BLOCKS = {"cifar_resnet8": 1, "cifar_resnet20": 3, "cifar_resnet32": 5}


def pretrained_cfg(name: str) -> dict:
    """The preprocessing config timm attaches to a CIFAR ResNet (``model.pretrained_cfg``): 32x32, CIFAR statistics."""
    return dict(architecture=name, tag="untrained", num_classes=10, input_size=(3, 32, 32), mean=CIFAR_MEAN,
                std=CIFAR_STD, first_conv="stem.0", classifier="head")


def create_cifar_resnet(name: str, **kwargs: object) -> CifarResNet:
    """``name`` (a key of :data:`CIFAR_RESNET_BLOCKS`) without classifier, as ``timm.create_model(name,
    num_classes=0)`` builds it: same constructor call (so the same weights for the same RNG state), same
    ``pretrained_cfg``."""
    model = CifarResNet(blocks=CIFAR_RESNET_BLOCKS[name], num_classes=0, in_chans=3, **kwargs)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name)
    return model
