"""Image transforms of the long-tail recipes, built on torchvision ``transforms.v2``.

Every transform takes an HWC uint8 numpy array (or a PIL image, or a CHW uint8 tensor) and returns a normalized
float32 CHW tensor. Images up to 64 px use the CIFAR recipes, larger ones the ImageNet recipes.

* ``test``: CIFAR: ToTensor + Normalize (METHODS.md §1.1); large: Resize(256/224 * size) + CenterCrop(size) (§1.2).
* ``standard``: CIFAR: RandomCrop(size, padding 4) + HFlip (LDAM-DRW, §1.1); large: RandomResizedCrop + HFlip.
* ``cbd_augmented``: standard + SimCLR colour jitter of strength 1.0 with p 0.8 + grayscale p 0.2 (CBD "data_aug"
  teachers, §7.2); ``gaussian_noise_std`` > 0 adds the unofficial PyTorch port's N(0, 0.01) noise.
* ``paco_query``: PaCo CIFAR query view: RandomCrop pad 4 + HFlip + AutoAugment (CIFAR10 policy) + Cutout (§4.3).
* ``paco_query_randaug``: PaCo ImageNet query view (``randcls``): RRC + HFlip + ColorJitter(0.4,0.4,0.4,0) +
  RandAugment(2, 10). Departure: torchvision's RandAugment, not timm's ``rand-n2-m10-mstd0.5`` (no magnitude noise).
* ``deit``: DeiT-LT's student view (``datasets.build_transform_deit``, §6.3): timm ``create_transform`` with
  RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.3, bicubic, RandomErasing 0.25 (pixel mode, one box); its
  RandomResizedCrop upsamples CIFAR to 224, and at 32 px or less it is replaced by RandomCrop(pad 4) as officially.
  Normalised with the ImageNet statistics unless the recipe says otherwise. Random draws: Python's ``random``.
* ``rac``: RAC's training view (Long et al. Tables S6-S7, no official code): RandomResizedCrop with area scale
  [0.95, 1] ("crop 0.95") and aspect ratio [0.75, 1.33] ("random scale"), HFlip 0.5, timm RandAugment with 3 layers
  at magnitude 1 (``rand-n3-m1``); the paper normalises with mean = std = 0.5 (the recipe's ``input``).
* ``simclr``: PaCo's key view ("SimCLR-CIFAR" / ``sim``): RRC(scale 0.2-1) + ColorJitter(0.4,0.4,0.4,0.1) p 0.8 +
  grayscale p 0.2 + GaussianBlur(sigma 0.1-2) p 0.5 + HFlip.

Every training view flips horizontally with p 0.5 unless ``hflip=False``: a dataset whose classes are not mirror
symmetric (digits: a mirrored 2, 3, 7 is no digit) declares ``hflip: false`` and every recipe's views drop the flip.

Random draws use torch's RNG (seeded per DataLoader worker by torch). Departure: PaCo's Cutout draws its centre from
the global numpy RNG; here it draws from torch's, so worker seeding covers it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

TRANSFORMS: Registry[Callable] = Registry("transform")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # LDAM-DRW / Saddle-LongTail (§1.1)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # digits / synthetic
DEFAULT_STD = (0.5, 0.5, 0.5)

SMALL_MAX = 64  # images up to this side use the CIFAR recipes


class ToImage(nn.Module):
    """HWC uint8 numpy array, (H, W) gray array, PIL image or CHW tensor -> CHW uint8 ``tv_tensors.Image``."""

    def forward(self, img) -> tv_tensors.Image:
        if isinstance(img, np.ndarray):
            arr = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)  # gray -> RGB
            return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))  # (3, H, W)
        if isinstance(img, torch.Tensor):
            return tv_tensors.Image(img)
        return v2.functional.to_image(img.convert("RGB"))


class ResizeIfNeeded(nn.Module):
    """Resize to (size, size) only when the image is not already that size (CIFAR 32 px input is left untouched)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.resize = v2.Resize((size, size), antialias=True)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img if tuple(img.shape[-2:]) == (self.size, self.size) else self.resize(img)


class Cutout(nn.Module):
    """PaCo's Cutout (``autoaug.py``): zero one (or more) ``length`` x ``length`` square(s) centred anywhere.

    The square is clipped at the border, so near an edge less is cut. Applied to the [0, 1] tensor before
    Normalize, as in PaCo.
    """

    def __init__(self, n_holes: int = 1, length: int = 16) -> None:
        super().__init__()
        self.n_holes, self.length = n_holes, length

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        out = img.clone()
        for _ in range(self.n_holes):
            y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y1, y2 = max(y - self.length // 2, 0), min(y + self.length // 2, h)
            x1, x2 = max(x - self.length // 2, 0), min(x + self.length // 2, w)
            out[..., y1:y2, x1:x2] = 0
        return out


class GaussianNoise(nn.Module):
    """Add N(0, std) noise to a [0, 1] float tensor (the unofficial CBD port's ``AddGaussianNoise``)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img + torch.randn_like(img) * self.std


def _finish(mean: Sequence[float], std: Sequence[float], extra: Sequence[nn.Module] = ()) -> list[nn.Module]:
    """uint8 -> float in [0, 1], optional tensor ops (Cutout, noise), then Normalize; plain tensor out."""
    return [
        v2.ToDtype(torch.float32, scale=True),
        *extra,
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


def _simclr_jitter(strength: float = 1.0) -> nn.Module:
    # SimCLR colour distortion: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) applied with p 0.8 (random op order inside).
    s = strength
    return v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8)


def _flip(hflip: bool) -> list[nn.Module]:
    return [v2.RandomHorizontalFlip()] if hflip else []


def _standard_geometry(image_size: int, hflip: bool = True) -> list[nn.Module]:
    if image_size <= SMALL_MAX:
        return [ResizeIfNeeded(image_size), v2.RandomCrop(image_size, padding=4), *_flip(hflip)]
    return [v2.RandomResizedCrop(image_size, antialias=True), *_flip(hflip)]


@TRANSFORMS.register("test")
def test_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True) -> Callable:
    """Deterministic evaluation transform (no randomness; ``hflip`` is accepted and has nothing to switch off)."""
    if image_size <= SMALL_MAX:
        ops: list[nn.Module] = [ResizeIfNeeded(image_size)]
    else:
        ops = [v2.Resize(int(round(image_size * 256 / 224)), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([ToImage(), *ops, *_finish(mean, std)])


@TRANSFORMS.register("standard")
def standard_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True) -> Callable:
    """Crop + flip: RandomCrop(pad 4) for small images, RandomResizedCrop for large ones."""
    return v2.Compose([ToImage(), *_standard_geometry(image_size, hflip), *_finish(mean, std)])


@TRANSFORMS.register("cbd_augmented")
def cbd_augmented_transform(
    *, image_size: int, mean: Sequence[float], std: Sequence[float], gaussian_noise_std: float = 0.0,
    hflip: bool = True,
) -> Callable:
    """CBD "data_aug" teacher: standard + SimCLR colour jitter (strength 1, p 0.8) + grayscale p 0.2.

    Args:
        gaussian_noise_std: 0 is the official pipeline; 0.01 reproduces the unofficial PyTorch port's extra noise.
    """
    ops = [*_standard_geometry(image_size, hflip), _simclr_jitter(1.0), v2.RandomGrayscale(p=0.2)]
    extra = [GaussianNoise(gaussian_noise_std)] if gaussian_noise_std > 0 else []
    return v2.Compose([ToImage(), *ops, *_finish(mean, std, extra)])


@TRANSFORMS.register("paco_query")
def paco_query_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float],
                         hflip: bool = True) -> Callable:
    """PaCo CIFAR query view: RandomCrop pad 4 + HFlip + AutoAugment(CIFAR10) + Cutout(1 hole, 16 px at 32 px)."""
    cutout = Cutout(n_holes=1, length=max(1, int(round(16 * image_size / 32))))
    ops = [
        ResizeIfNeeded(image_size),
        v2.RandomCrop(image_size, padding=4),
        *_flip(hflip),
        v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    ]
    return v2.Compose([ToImage(), *ops, *_finish(mean, std, [cutout])])


@TRANSFORMS.register("paco_query_randaug")
def paco_query_randaug_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float],
                                 hflip: bool = True) -> Callable:
    """PaCo ImageNet query view (``randcls``): RRC(0.08-1) + HFlip + ColorJitter(0.4,0.4,0.4,0) + RandAugment(2, 10)."""
    ops = [
        v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
        *_flip(hflip),
        v2.ColorJitter(0.4, 0.4, 0.4, 0.0),
        v2.RandAugment(num_ops=2, magnitude=10),
    ]
    return v2.Compose([ToImage(), *ops, *_finish(mean, std)])


class ToPIL(nn.Module):
    """HWC uint8 numpy array (or gray (H, W), CHW uint8 tensor, PIL image) → RGB PIL image, for timm's transforms."""

    def forward(self, img):
        from PIL import Image

        if isinstance(img, Image.Image):
            return img.convert("RGB")
        return v2.functional.to_pil_image(ToImage()(img))


def _posterize_zero_bits_black(img, bits_to_keep: int, **_: object):
    """timm's posterize op; 0 bits gives a black image (Pillow < 11 did that, Pillow ≥ 11 raises)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(t) -> None:
    """Give every RandAugment posterize op of the timm transform ``t`` the 0-bits-is-black behaviour."""
    for op in t.transforms:
        for aug in getattr(op, "ops", ()):
            if aug.aug_fn.__name__ == "posterize":
                aug.aug_fn = _posterize_zero_bits_black


@TRANSFORMS.register("deit")
def deit_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: str = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.3,
    re_prob: float = 0.25,
    interpolation: str = "bicubic",
    hflip: bool = True,
) -> Callable:
    """DeiT-LT student view (METHODS.md §6.3); the arguments default to the official ones.

    Magnitude 10 (a draw of 9 ± 0.5 clipped at 10, about 2 % of draws) makes timm's PosterizeIncreasing keep 0 bits,
    which Pillow ≥ 11 rejects; the Pillow of the official environment returned a black image, and so does this one.
    """
    from timm.data import create_transform as timm_transform

    t = timm_transform(image_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
                       interpolation=interpolation, re_prob=re_prob, re_mode="pixel", re_count=1,
                       mean=tuple(mean), std=tuple(std), hflip=0.5 if hflip else 0.0)
    _patch_posterize(t)
    if image_size <= 32:  # as build_transform_deit: no resized crop for CIFAR-sized inputs
        from torchvision import transforms as tv1

        t.transforms[0] = tv1.RandomCrop(image_size, padding=4)
        return v2.Compose([ToImage(), ResizeIfNeeded(image_size), ToPIL(), *t.transforms])
    return v2.Compose([ToPIL(), *t.transforms])


@TRANSFORMS.register("rac")
def rac_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float],
                  auto_augment: str = "rand-n3-m1", hflip: bool = True) -> Callable:
    """RAC training view (Tables S6-S7, as read above)."""
    from timm.data import create_transform as timm_transform

    t = timm_transform(image_size, is_training=True, scale=(0.95, 1.0), ratio=(0.75, 1.33), hflip=0.5 if hflip else 0.0,
                       auto_augment=auto_augment, color_jitter=0.0, interpolation="bicubic", mean=tuple(mean),
                       std=tuple(std))
    _patch_posterize(t)  # rand-n3-m1's Posterize keeps int(0.1 · 4) = 0 bits
    return v2.Compose([ToPIL(), *t.transforms])


@TRANSFORMS.register("simclr")
def simclr_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True) -> Callable:
    """PaCo key view (MoCo v2 / SimCLR): RRC(0.2-1), jitter p 0.8, grayscale p 0.2, blur p 0.5, HFlip.

    The blur mirrors PIL's ``GaussianBlur(radius=sigma)`` with sigma ~ U(0.1, 2) px and a 13 px kernel (3 sigma).
    """
    ops = [
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=0.5),
        *_flip(hflip),
    ]
    return v2.Compose([ToImage(), *ops, *_finish(mean, std)])


def create_transform(name: str, *, image_size: int, mean: Sequence[float], std: Sequence[float], **kwargs) -> Callable:
    """Build the transform registered as ``name`` (``TRANSFORMS.names()`` lists them).

    Args:
        name: test, standard, cbd_augmented, paco_query, paco_query_randaug, deit, rac or simclr.
        image_size: output side in pixels.
        mean: per-channel normalization mean (CIFAR_MEAN, IMAGENET_MEAN, DEFAULT_MEAN, ...).
        std: per-channel normalization std.
        **kwargs: transform options (e.g. ``gaussian_noise_std`` for cbd_augmented).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return TRANSFORMS.create(name, image_size=image_size, mean=mean, std=std, **kwargs)


class BatchAdapter(nn.Module):
    """Re-prepare a normalised image batch for another network: resize, then swap the normalisation.

    DeiT-LT feeds its teacher the student's augmented and mixed batch through ``Resize(teacher_size, bicubic)``
    (torchvision 0.15 on tensors: no antialias, METHODS.md §6.2). ``renormalize=True`` first undoes the student's
    normalisation and applies the teacher's own; ``False`` is the official behaviour (the teacher receives the
    student-normalised tensor as is).

    Args:
        size: output side (None keeps the size).
        src_mean, src_std: normalisation of the incoming batch.
        dst_mean, dst_std: normalisation the receiving network was trained with.
        renormalize: swap the normalisation (True) or only resize (False).
        interpolation: ``bicubic`` (official) or ``bilinear``.
    """

    def __init__(self, size: int | None, src_mean: Sequence[float], src_std: Sequence[float],
                 dst_mean: Sequence[float], dst_std: Sequence[float], renormalize: bool = True,
                 interpolation: str = "bicubic") -> None:
        super().__init__()
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation {interpolation!r}; valid: bicubic, bilinear")
        self.size, self.renormalize, self.interpolation = size, bool(renormalize), interpolation
        for name, v in (("src_mean", src_mean), ("src_std", src_std), ("dst_mean", dst_mean), ("dst_std", dst_std)):
            self.register_buffer(name, torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode=self.interpolation,
                                                align_corners=False)
        if self.renormalize:
            x = (x * self.src_std + self.src_mean - self.dst_mean) / self.dst_std
        return x
