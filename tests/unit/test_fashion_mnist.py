"""The fashion_mnist source (Fashion-MNIST's idx files, written here in their real format) and the
fashion_mnist_lt preset: CIFAR-10-LT's exact per-class counts, disjoint train / val / test."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data import build_longtail
from pipeline.data.longtail import shot_groups
from pipeline.data.sources import FASHION_MNIST_CLASSES, SourceData, SourceError, SplitData, load_source, read_idx

ROOT = Path(__file__).resolve().parents[2]


def _idx(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 ndim, big-endian uint32 sizes, the bytes."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, a in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = _idx(a)
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files_padded_to_32_rgb(tmp_path, gz):
    arrays = _write(tmp_path, gz=gz)
    src = load_source("fashion_mnist", root=str(tmp_path))
    assert src.classes == FASHION_MNIST_CLASSES and set(src.splits) == {"train", "test"}
    tr, te = src.splits["train"], src.splits["test"]
    assert tr.images.shape == (20, 32, 32, 3) and te.images.shape == (10, 32, 32, 3) and tr.images.dtype == np.uint8
    images, labels = arrays["train"]
    assert np.array_equal(tr.labels, labels) and tr.labels.dtype == np.int64
    assert np.array_equal(tr.images[:, 2:30, 2:30, 0], images)  # centred, not resampled
    assert not tr.images[:, :2].any() and not tr.images[:, 30:].any() and not tr.images[:, :, :2].any()  # zero pad
    assert np.array_equal(tr.images[..., 0], tr.images[..., 2])  # grey replicated
    assert np.array_equal(te.images[:, 2:30, 2:30, 1], arrays["t10k"][0])
    native = load_source("fashion_mnist", root=str(tmp_path), image_size=28)
    assert native.splits["test"].images.shape == (10, 28, 28, 3)


def test_read_idx_shape_and_magic(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(_idx(a))
    assert np.array_equal(read_idx(str(tmp_path / "x")), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float data: not Fashion-MNIST's format
    with pytest.raises(SourceError, match="not an IDX file of unsigned bytes"):
        read_idx(str(tmp_path / "bad"))


def test_missing_file_names_it_and_both_ways_to_get_it(tmp_path):
    _write(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError) as e:
        load_source("fashion_mnist", root=str(tmp_path))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=true" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_is_one_line_naming_it(tmp_path, gz):
    _write(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SourceError, match="truncated") as e:
        load_source("fashion_mnist", root=str(tmp_path))
    assert name in str(e.value) and "\n" not in str(e.value)


def _preset(**overrides) -> dict:
    cfg = yaml.safe_load((ROOT / "conf" / "dataset" / "fashion_mnist_lt.yaml").read_text())
    return {**cfg, **overrides}


def _fake_pool() -> SourceData:
    """Fashion-MNIST's shape of pool: 6,000 train images per class, 1,000 test per class (1x1 px: counts only)."""
    train = np.repeat(np.arange(10), 6000)
    test = np.repeat(np.arange(10), 1000)
    return SourceData("fashion_mnist", list(FASHION_MNIST_CLASSES), {
        "train": SplitData(labels=train, images=np.zeros((len(train), 1, 1, 3), np.uint8)),
        "test": SplitData(labels=test, images=np.zeros((len(test), 1, 1, 3), np.uint8))})


def _build(cfg: dict):
    return build_longtail(_fake_pool(), profile=cfg["profile"], imbalance_factor=cfg["imbalance_factor"],
                          n_max=cfg["n_max"], val_per_class=cfg["val_per_class"], test_per_class=cfg["test_per_class"],
                          seed=cfg["seed"], many=cfg["many"], few=cfg["few"])


def test_preset_gives_cifar10_lt_counts_and_disjoint_splits():
    cfg = _preset()
    ds = _build(cfg)
    counts = ds.train_counts
    # LDAM-DRW's get_img_num_per_cls: int(n_max · (1/IF)^(i / (C - 1))), CIFAR-10-LT's 12,406
    assert counts == [int(5000 * (1 / 100) ** (i / 9)) for i in range(10)]
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and sum(counts) == 12406
    assert np.array_equal(np.bincount(ds.splits["val"].labels), [200] * 10)
    assert np.array_equal(np.bincount(ds.splits["test"].labels), [1000] * 10)
    ids = {s: set(ds.splits[s].ids.tolist()) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert shot_groups(counts, cfg["many"], cfg["few"]) == ["many"] * 3 + ["medium"] * 4 + ["few"] * 3
    assert ds.manifest()["shot_group_sizes"] == {"many": 3, "medium": 4, "few": 3}
    assert (ds.manifest()["thresholds"]["many"], ds.manifest()["thresholds"]["few"]) == (1500, 200)


@pytest.mark.parametrize("factor, total", [(10, 20431), (50, 13996)])
def test_preset_other_imbalance_factors(factor, total):
    ds = _build(_preset(imbalance_factor=float(factor)))
    assert ds.train_counts == [int(5000 * (1 / factor) ** (i / 9)) for i in range(10)] and sum(ds.train_counts) == total
    assert np.array_equal(np.bincount(ds.splits["val"].labels), [200] * 10)


def test_val_and_test_are_the_balanced_upper_bounds_too():
    # the upper bound rebuilds the dataset with profile none (5,000 per class) and requires the same val and test
    lt, balanced = _build(_preset()), _build(_preset(profile="none"))
    assert balanced.train_counts == [5000] * 10
    for split in ("val", "test"):
        assert np.array_equal(lt.splits[split].ids, balanced.splits[split].ids)
    assert not set(balanced.splits["train"].ids.tolist()) & set(lt.splits["val"].ids.tolist())
    assert set(lt.splits["train"].ids.tolist()) <= set(balanced.splits["train"].ids.tolist())  # LDAM-DRW's prefixes
