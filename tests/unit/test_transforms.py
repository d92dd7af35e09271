"""Transforms: every registered one maps a uint8 image to a normalized (3, S, S) float tensor; test is exact."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import CIFAR_MEAN, CIFAR_STD, TRANSFORMS, Cutout, create_transform
from pipeline.registry import UnknownNameError

IMG = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", TRANSFORMS.names())
@pytest.mark.parametrize("size, src", [(32, 32), (32, 20), (96, 120)])
def test_every_transform_gives_a_normalized_chw_tensor(name, size, src):
    img = np.random.default_rng(1).integers(0, 256, size=(src, src + 4, 3), dtype=np.uint8)
    # DeiT-LT's RandomErasing (pixel mode) fills its box with N(0, 1) noise in normalised space: test without it
    kwargs = {"re_prob": 0.0} if name == "deit" else {}
    t = create_transform(name, image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kwargs)
    torch.manual_seed(0)
    random.seed(0)  # timm's RandAugment draws from Python's RNG
    for x in (img, Image.fromarray(img)):
        out = t(x)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, size, size)
        assert out.min() >= -1.5 and out.max() <= 1.5  # [0,1] -> [-1,1] (+ small noise at most)


def test_deit_transform_posterize_at_zero_bits_gives_black_and_erasing_noise():
    """Magnitude 10 makes timm keep 0 bits in PosterizeIncreasing: black (old Pillow), not a Pillow error."""
    from pipeline.data.transforms import _posterize_zero_bits_black

    black = _posterize_zero_bits_black(Image.fromarray(IMG), 0)
    assert np.asarray(black).max() == 0 and black.size == (32, 32)
    assert np.array_equal(np.asarray(_posterize_zero_bits_black(Image.fromarray(IMG), 8)), IMG)
    t = create_transform("deit", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), re_prob=1.0,
                         auto_augment="rand-m10-n2-inc1")  # every draw at magnitude 10: posterize keeps 0 bits
    random.seed(0)
    torch.manual_seed(0)
    outs = [t(IMG) for _ in range(20)]  # never raises
    assert any(o.min() < -1.0 - 1e-6 or o.max() > 1.0 + 1e-6 for o in outs)  # the erased box holds N(0, 1) noise


def test_test_transform_is_exact_and_deterministic():
    t = create_transform("test", image_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    a, b = t(IMG), t(IMG)
    assert torch.equal(a, b)
    ref = (
        torch.from_numpy(IMG).permute(2, 0, 1).float() / 255 - torch.tensor(CIFAR_MEAN)[:, None, None]
    ) / torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(a, ref)
    big = create_transform("test", image_size=224, mean=(0, 0, 0), std=(1, 1, 1))
    x = np.zeros((300, 400, 3), np.uint8)
    x[:, 200:] = 255  # right half white: after Resize(256) + CenterCrop(224) the crop straddles the edge
    y = big(x)
    assert y.shape == (3, 224, 224) and torch.equal(y, big(x))
    assert y[:, :, 0].max() == 0 and y[:, :, -1].min() == 1


def test_standard_keeps_pixels_of_the_image():
    t = create_transform("standard", image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    out = t(np.full((32, 32, 3), 255, np.uint8))
    # RandomCrop with zero padding 4: only values 1 (image) and 0 (padding), at most 4 padded rows/cols per side
    assert set(out.unique().tolist()) <= {0.0, 1.0} and (out == 1).float().mean() >= (28 / 32) ** 2


def test_cutout_zeroes_a_clipped_square():
    torch.manual_seed(0)
    out = Cutout(1, 16)(torch.ones(3, 32, 32))
    zeros = (out[0] == 0).sum().item()
    assert 64 <= zeros <= 256 and torch.equal(out[0] == 0, out[2] == 0)


def test_cbd_noise_option_changes_output():
    kw = dict(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    a = create_transform("cbd_augmented", **kw)(IMG)
    torch.manual_seed(0)
    b = create_transform("cbd_augmented", gaussian_noise_std=0.01, **kw)(IMG)
    assert 0.001 < (a - b).std().item() < 0.05


def test_unknown_transform():
    with pytest.raises(UnknownNameError, match="standard"):
        create_transform("autoaugment", image_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)


def _has_flip(t) -> bool:
    ops = getattr(t, "transforms", [])
    return any(type(op).__name__ == "RandomHorizontalFlip" or _has_flip(op) for op in ops)


@pytest.mark.parametrize("name", [n for n in TRANSFORMS.names() if n != "test"])
def test_hflip_false_removes_every_flip(name):
    """A dataset that declares hflip: false (digits) gets no mirrored training view from any recipe."""
    kw = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert _has_flip(create_transform(name, **kw)) and not _has_flip(create_transform(name, hflip=False, **kw))


def test_train_loader_takes_hflip_from_the_dataset(build_ctx, make_train_config):
    import dataclasses

    from pipeline.build import create_train_loader

    cfg = make_train_config(transforms=["standard", "simclr"])
    for hflip in (True, False):
        ctx = dataclasses.replace(build_ctx, dataset=dataclasses.replace(build_ctx.dataset, hflip=hflip))
        views = create_train_loader(cfg, ctx, torch.device("cpu")).dataset.transforms
        assert all(_has_flip(v) == hflip for v in views)
