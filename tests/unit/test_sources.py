"""Sources: digits, synthetic, CIFAR pickles (real format, written in a temp dir) and OLTR split files."""

import os
import pickle

import numpy as np
import pytest

from pipeline.data.sources import SOURCES, SourceError, load_source
from pipeline.registry import UnknownNameError


def test_digits_is_32px_rgb_uint8():
    src = load_source("digits")
    tr = src.splits["train"]
    assert set(src.splits) == {"train"}
    assert tr.images.shape == (1797, 32, 32, 3) and tr.images.dtype == np.uint8
    assert tr.labels.dtype == np.int64 and np.array_equal(np.unique(tr.labels), np.arange(10))
    assert tr.images.max() == 255 and tr.images.min() == 0
    assert np.array_equal(tr.images[..., 0], tr.images[..., 2])  # gray replicated
    assert src.classes == [str(i) for i in range(10)]
    assert load_source("digits", image_size=8).splits["train"].images.shape == (1797, 8, 8, 3)


def test_synthetic_is_deterministic_and_class_dependent():
    a = load_source("synthetic", num_classes=6, images_per_class=40, image_size=16, seed=3)
    b = load_source("synthetic", num_classes=6, images_per_class=40, image_size=16, seed=3)
    c = load_source("synthetic", num_classes=6, images_per_class=40, image_size=16, seed=4)
    ta = a.splits["train"]
    assert ta.images.shape == (240, 16, 16, 3) and ta.images.dtype == np.uint8
    assert np.array_equal(ta.images, b.splits["train"].images)
    assert not np.array_equal(ta.images, c.splits["train"].images)
    assert np.array_equal(np.bincount(ta.labels), [40] * 6)
    # nearest class mean (fit on even, tested on odd images) separates the classes: the images depend on the class
    x = ta.images.reshape(len(ta), -1).astype(np.float64)
    tr, te = np.arange(0, 240, 2), np.arange(1, 240, 2)
    means = np.stack([x[tr][ta.labels[tr] == k].mean(0) for k in range(6)])
    pred = ((x[te][:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ta.labels[te]).mean() > 0.9
    with pytest.raises(ValueError, match="num_classes"):
        load_source("synthetic", num_classes=0)


def _write_fake_cifar10(root, n_per_batch=6, n_test=4):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batches.append((data, labels))
        with open(os.path.join(base, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": labels, "data": data}, f, protocol=2)
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    with open(os.path.join(base, "test_batch"), "wb") as f:
        pickle.dump({"labels": list(range(n_test)), "data": test}, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f, protocol=2)
    return batches, test, names


def test_cifar10_reads_the_official_pickle_format(tmp_path):
    batches, test, names = _write_fake_cifar10(str(tmp_path))
    src = load_source("cifar10", root=str(tmp_path))
    tr, te = src.splits["train"], src.splits["test"]
    assert src.classes == names
    assert tr.images.shape == (30, 32, 32, 3) and te.images.shape == (4, 32, 32, 3)
    assert np.array_equal(tr.labels, sum((b[1] for b in batches), []))
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major (32 x 32)
    first = batches[0][0][0]
    assert tr.images[0, 0, 1, 0] == first[1] and tr.images[0, 2, 3, 1] == first[1024 + 2 * 32 + 3]
    assert tr.images[0, 31, 31, 2] == first[3071]
    assert np.array_equal(te.labels, [0, 1, 2, 3])


def test_cifar100_reads_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        entry = {"fine_labels": list(range(n)), "coarse_labels": [0] * n, "data": np.zeros((n, 3072), np.uint8)}
        (base / split).write_bytes(pickle.dumps(entry, protocol=2))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=2))
    src = load_source("cifar100", root=str(tmp_path))
    assert len(src.classes) == 100 and np.array_equal(src.splits["train"].labels, range(5))
    assert src.splits["test"].images.shape == (3, 32, 32, 3)


def test_cifar_missing_says_how_to_provide_it(tmp_path):
    with pytest.raises(SourceError, match=r"download=true.*cifar-10-batches-py") as e:
        load_source("cifar10", root=str(tmp_path))
    assert str(tmp_path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_imagefolder_reads_split_files(tmp_path):
    (tmp_path / "train.txt").write_text("a/x0.png 1\na/x1.png 0\n\nb/x2.png 2\n")
    (tmp_path / "test.txt").write_text("t/y0.png 0\nt/y1.png 2\n")
    src = load_source("imagefolder", root=str(tmp_path), train_file="train.txt", test_file="test.txt")
    tr = src.splits["train"]
    assert src.given_longtail and src.classes == ["0", "1", "2"] and set(src.splits) == {"train", "test"}
    assert tr.paths == ["a/x0.png", "a/x1.png", "b/x2.png"] and list(tr.labels) == [1, 0, 2]
    assert tr.root == str(tmp_path) and tr.images is None


def test_imagefolder_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_source("imagefolder", root=str(tmp_path / "nope"), train_file="train.txt")
    with pytest.raises(SourceError, match="train.txt"):
        load_source("imagefolder", root=str(tmp_path), train_file="train.txt")
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 5\n")
    with pytest.raises(SourceError, match="0..C-1"):
        load_source("imagefolder", root=str(tmp_path), train_file="train.txt")
    (tmp_path / "bad.txt").write_text("a.png zero\n")
    with pytest.raises(SourceError, match="not an integer"):
        load_source("imagefolder", root=str(tmp_path), train_file="bad.txt")


def test_registry_lists_sources():
    assert SOURCES.names() == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "synthetic"]
    with pytest.raises(UnknownNameError, match="digits"):
        load_source("mnist")
