"""The dataset builder, atomic save/load, the class-count plot, ImageDataset and collate."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data import (
    ImageDataset,
    SourceData,
    SplitData,
    build_longtail,
    collate,
    create_transform,
    load_manifest,
    load_source,
    load_split,
    longtail_counts,
    plot_class_counts,
    save_dataset,
    subsample_indices,
)


def _ids(split):
    return set(split.ids.tolist())


def test_digits_builder_carves_balanced_test_and_val_first():
    src = load_source("digits")
    ds = build_longtail(
        src, profile="exp", imbalance_factor=10, n_max=None, val_per_class=10, test_per_class=30, seed=0
    )
    tr, va, te = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    assert np.array_equal(np.bincount(te.labels), [30] * 10) and np.array_equal(np.bincount(va.labels), [10] * 10)
    assert not (_ids(tr) & _ids(va) or _ids(tr) & _ids(te) or _ids(va) & _ids(te))  # disjoint
    # n_max defaults to the fewest images left in any class after the carve-outs
    left = np.bincount(src.splits["train"].labels) - 40
    assert ds.train_counts == longtail_counts(int(left.min()), 10, 10)
    assert np.array_equal(np.bincount(tr.labels, minlength=10), ds.train_counts)
    # ids are pool indices: the images match the source's
    assert np.array_equal(tr.images, src.splits["train"].images[tr.ids])
    m = ds.manifest()
    assert m["profile"] == "exp" and m["imbalance_factor_requested"] == 10.0 and m["num_classes"] == 10
    assert m["split_sizes"] == {"train": len(tr), "val": 100, "test": 300}
    assert m["imbalance_factor"] == ds.train_counts[0] / ds.train_counts[-1]
    # the test set does not move when val_per_class changes (independent carve-out streams)
    ds2 = build_longtail(src, imbalance_factor=10, val_per_class=0, test_per_class=30, seed=0)
    assert np.array_equal(ds2.splits["test"].ids, te.ids) and len(ds2.splits["val"]) == 0
    with pytest.raises(ValueError, match="test_per_class"):
        build_longtail(src, imbalance_factor=10, test_per_class=0)


def _cifar_like(n_per_class=50, C=10, n_test=5):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(C), n_per_class))
    images = rng.integers(0, 256, size=(len(labels), 4, 4, 3), dtype=np.uint8)
    test = SplitData(labels=np.repeat(np.arange(C), n_test), images=np.zeros((C * n_test, 4, 4, 3), np.uint8))
    return SourceData("cifar10", [str(c) for c in range(C)], {"train": SplitData(labels, images), "test": test})


def test_cifar_builder_uses_the_official_selection():
    src = _cifar_like()
    ds = build_longtail(src, imbalance_factor=10, val_per_class=0, test_per_class=0, seed=0)
    counts = longtail_counts(50.0, 10, 10)  # img_max = len(train) / C as a float
    assert ds.train_counts == counts and len(ds.splits["val"]) == 0
    assert np.array_equal(ds.splits["train"].ids, subsample_indices(src.splits["train"].labels, counts, 0))
    assert np.array_equal(ds.splits["test"].ids, 500 + np.arange(50))  # official test, ids offset past train
    assert np.array_equal(ds.splits["test"].labels, src.splits["test"].labels)
    # the head class uses all its images: a val set needs a smaller n_max, and the error says so
    with pytest.raises(ValueError, match=r"class 0 has only 0 .* n_max <= 47"):
        build_longtail(src, imbalance_factor=10, val_per_class=3, test_per_class=0, seed=0)
    ds = build_longtail(src, imbalance_factor=10, n_max=47, val_per_class=3, test_per_class=0, seed=0)
    assert ds.train_counts == longtail_counts(47, 10, 10)
    va = ds.splits["val"]
    assert np.array_equal(np.bincount(va.labels), [3] * 10) and not _ids(va) & _ids(ds.splits["train"])


def test_given_longtail_is_kept(tmp_path):
    labels = np.repeat([0, 1, 2], [6, 3, 1])
    src = SourceData(
        "imagefolder",
        ["a", "b", "c"],
        {
            "train": SplitData(labels, paths=[f"tr/{i}.png" for i in range(10)], root=str(tmp_path)),
            "test": SplitData(np.arange(3), paths=[f"te/{i}.png" for i in range(3)], root=str(tmp_path)),
        },
        given_longtail=True,
    )
    ds = build_longtail(src, profile="exp", imbalance_factor=100, val_per_class=0, test_per_class=0, seed=0)
    assert ds.profile == "given" and ds.train_counts == [6, 3, 1] and ds.shot_groups == ["few"] * 3
    assert ds.splits["train"].paths == src.splits["train"].paths and len(ds.splits["val"]) == 0
    assert ds.manifest()["imbalance_factor"] == 6.0 and ds.manifest()["imbalance_factor_requested"] is None


def test_save_load_roundtrip_and_atomic_replace(tmp_path):
    src = load_source("synthetic", num_classes=3, images_per_class=30, image_size=8)
    ds = build_longtail(src, imbalance_factor=4, val_per_class=2, test_per_class=5, seed=1)
    out = tmp_path / "dataset"
    save_dataset(ds, str(out))
    assert sorted(os.listdir(out)) == ["manifest.json", "test.npz", "train.npz", "val.npz"]
    m = load_manifest(str(out))
    assert m["train_counts"] == ds.train_counts and m["shot_groups"] == ds.shot_groups and m["seed"] == 1
    for name in ("train", "val", "test"):
        s = load_split(str(out), name)
        assert np.array_equal(s.labels, ds.splits[name].labels) and np.array_equal(s.ids, ds.splits[name].ids)
        assert np.array_equal(s.images, ds.splits[name].images)
    # a second save replaces the first and leaves no temporaries behind
    ds2 = build_longtail(src, imbalance_factor=2, val_per_class=2, test_per_class=5, seed=1)
    save_dataset(ds2, str(out))
    assert load_manifest(str(out))["train_counts"] == ds2.train_counts
    assert os.listdir(tmp_path) == ["dataset"]
    with pytest.raises(FileNotFoundError, match="dataset stage"):
        load_split(str(tmp_path / "missing"), "train")


def test_save_load_paths(tmp_path):
    split = SplitData(np.array([0, 1]), paths=["a/x.png", "b/y.png"], root="/data/imgs", ids=np.array([5, 9]))
    ds = build_longtail(
        SourceData("imagefolder", ["0", "1"], {"train": split, "test": split}, given_longtail=True), seed=0
    )
    save_dataset(ds, str(tmp_path / "d"))
    s = load_split(str(tmp_path / "d"), "train")
    assert s.paths == ["a/x.png", "b/y.png"] and s.root == "/data/imgs" and s.images is None


def test_plot_class_counts_writes_png(tmp_path):
    path = tmp_path / "counts.png"
    plot_class_counts([500, 100, 20, 5], ["many", "medium", "medium", "few"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_dataset_views_and_collate(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    split = SplitData(labels=np.arange(6) % 3, images=images)
    kw = dict(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageDataset(split, [create_transform("test", **kw), create_transform("standard", **kw)])
    views, label, index = ds[4]
    assert len(views) == 2 and views[0].shape == (3, 32, 32) and (label, index) == (1, 4)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert [v.shape for v in batch["images"]] == [(4, 3, 32, 32)] * 2
    assert batch["labels"].tolist() == [0, 1, 2, 0] and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["labels"].dtype == torch.long
    torch.testing.assert_close(batch["images"][0][1], views_of(ds, 1))
    # lazy on-disk images (PIL, RGB)
    for i in range(2):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
    lazy = ImageDataset(SplitData(np.array([0, 1]), paths=["0.png", "1.png"], root=str(tmp_path)), [ds.transforms[0]])
    torch.testing.assert_close(lazy[1][0][0], views_of(ds, 1))


def views_of(ds, i):
    return ds[i][0][0]
