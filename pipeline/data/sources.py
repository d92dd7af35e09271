"""Image sources: where the raw pool of labelled images comes from, before any long-tail subsampling.

Each source returns a :class:`SourceData` whose splits are among ``train`` / ``val`` / ``test``:

* ``digits``: scikit-learn's 8x8 handwritten digits (shipped with the package, offline), 1,797 images, upscaled
  to ``image_size`` and replicated to RGB so CIFAR backbones take them. Only a ``train`` pool.
* ``synthetic``: deterministic class-conditional images of any size and class count (scale tests). ``train`` only.
* ``cifar10`` / ``cifar100``: the official python pickles (``cifar-10-batches-py`` / ``cifar-100-python``) under
  ``root``; torchvision downloads them when ``download=True``. Official ``train`` and ``test`` splits.
* ``fashion_mnist``: Zalando's Fashion-MNIST, the four original idx files (gzipped or not) under ``root``
  (Debian's ``dataset-fashion-mnist`` installs them; torchvision downloads them when ``download=True``), 28x28
  grey images zero-padded to ``image_size`` and replicated to RGB. Official ``train`` (60,000) and ``test`` (10,000).
* ``imagefolder``: an image root plus OLTR-style split files (``relative/path label`` per line, METHODS.md §1.2),
  as used by ImageNet-LT, Places-LT and iNaturalist-2018. Images stay on disk and load lazily.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import os
import pickle
from dataclasses import dataclass, field

import numpy as np

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """A data source is missing or malformed; the message says where it was looked for and how to provide it."""


@dataclass
class SplitData:
    """One split: labels plus either in-memory images or lazily loaded paths.

    Attributes:
        labels: (N,) int64 class ids.
        images: (N, H, W, 3) uint8 images, or None for on-disk sources.
        paths: N paths relative to ``root`` (on-disk sources), or None.
        root: directory the paths are relative to.
        ids: (N,) int64 stable sample ids (set by the dataset builder), or None.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    root: str | None = None
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if self.images is not None and len(self.images) != n:
            raise ValueError(f"split has {n} labels but {len(self.images)} images")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"split has {n} labels but {len(self.paths)} paths")
        if self.ids is not None:
            self.ids = np.asarray(self.ids, dtype=np.int64)
            if len(self.ids) != n:
                raise ValueError(f"split has {n} labels but {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> SplitData:
        """The samples at ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        return SplitData(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            root=self.root,
            ids=None if self.ids is None else self.ids[idx],
        )


@dataclass
class SourceData:
    """A loaded source.

    Attributes:
        name: source name.
        classes: class names; label ``i`` is ``classes[i]``.
        splits: available splits (keys among train / val / test).
        given_longtail: True when the source's train split is already long-tailed (split files of ImageNet-LT
            and friends) and must not be subsampled again.
    """

    name: str
    classes: list[str]
    splits: dict[str, SplitData] = field(default_factory=dict)
    given_longtail: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


SOURCES: Registry[SourceData] = Registry("data source")


def load_source(name: str, **kwargs) -> SourceData:
    """Load the source registered as ``name`` with its keyword arguments (see each loader)."""
    return SOURCES.create(name, **kwargs)


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize (N, H, W) or (N, H, W, 3) uint8 images to (N, size, size[, 3]) with PIL."""
    from PIL import Image

    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


@SOURCES.register("digits")
def load_digits_source(image_size: int = 32) -> SourceData:
    """scikit-learn's handwritten digits: 1,797 8x8 images of 10 classes (about 180 each), offline.

    The 0..16 intensities are mapped to 0..255 uint8, resized bilinearly to ``image_size`` and replicated to three
    channels, so the images are 32x32 RGB like CIFAR by default and every CIFAR backbone/transform takes them.

    Args:
        image_size: output side in pixels.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    gray = _resize_uint8(gray, image_size)  # (N, S, S)
    rgb = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))  # (N, S, S, 3)
    classes = [str(int(t)) for t in d.target_names]
    return SourceData("digits", classes, {"train": SplitData(labels=d.target, images=rgb)})


@SOURCES.register("synthetic")
def load_synthetic_source(
    num_classes: int = 10, images_per_class: int = 100, image_size: int = 32, seed: int = 0, noise: float = 24.0
) -> SourceData:
    """Deterministic class-conditional images for scale tests.

    Each class has a smooth random prototype (a 4x4 RGB pattern upsampled bilinearly to the image size, so it has
    both a colour and a spatial layout). Each image is its class prototype circularly shifted by up to
    ``image_size // 8`` pixels, scaled in brightness by U(0.8, 1.2) and corrupted with Gaussian noise of std
    ``noise`` (in 0..255 units). A small CNN learns it, but not trivially from one pixel.

    Args:
        num_classes: number of classes.
        images_per_class: pool size per class (the long-tail builder subsamples it).
        image_size: side in pixels.
        seed: everything is a function of this seed.
        noise: std of the per-pixel Gaussian noise.
    """
    import torch
    import torch.nn.functional as F

    if num_classes < 1 or images_per_class < 1 or image_size < 4:
        raise ValueError(
            f"synthetic source needs num_classes >= 1, images_per_class >= 1, image_size >= 4; got "
            f"{num_classes}, {images_per_class}, {image_size}"
        )
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 255, size=(num_classes, 3, 4, 4)).astype(np.float32))
    protos = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = protos.permute(0, 2, 3, 1).numpy()  # (C, S, S, 3)
    n = num_classes * images_per_class
    labels = np.repeat(np.arange(num_classes), images_per_class)
    max_shift = max(1, image_size // 8)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    gains = rng.uniform(0.8, 1.2, size=n).astype(np.float32)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        im = np.roll(protos[labels[i]], shift=(int(shifts[i, 0]), int(shifts[i, 1])), axis=(0, 1)) * gains[i]
        im = im + rng.normal(0.0, noise, size=im.shape).astype(np.float32)
        images[i] = np.clip(np.rint(im), 0, 255).astype(np.uint8)
    classes = [f"class_{c}" for c in range(num_classes)]
    return SourceData("synthetic", classes, {"train": SplitData(labels=labels, images=images)})


# name -> (folder, train files, test files, meta file, label key, class-name key, torchvision class)
_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", "CIFAR100"),
}


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


# The only globals the official CIFAR pickles (dicts of strings, lists and uint8 arrays) reference; resolving any
# other one could run code, so _SafeUnpickler refuses it.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
    ("numpy.core.multiarray", "scalar"): lambda: _multiarray().scalar,
    ("numpy._core.multiarray", "scalar"): lambda: _multiarray().scalar,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a pickle naming any other callable is refused, never run."""

    def find_class(self, module: str, name: str):
        getter = _CIFAR_GLOBALS.get((module, name))
        if getter is None:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which is not part of the CIFAR format")
        return getter()


def _unpickle(path: str) -> dict:
    # The CIFAR pickles were written by Python 2; latin1 decodes their byte strings (as torchvision does).
    try:
        with open(path, "rb") as f:
            entry = _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise SourceError(f"{path}: refused, not an official CIFAR pickle ({e}); download it again") from None
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: not an official CIFAR pickle (holds a {type(entry).__name__}); download it again")
    return entry


def _load_cifar(name: str, root: str, download: bool) -> SourceData:
    """Read the official CIFAR python pickles under ``root`` (downloading them with torchvision if asked).

    Loading reads the pickles directly (same format and decoding as ``torchvision.datasets.CIFAR10``) instead of
    going through torchvision's dataset class, whose ``_check_integrity`` verifies md5 sums: that would make the
    real-format loader untestable offline with a tiny fake archive. torchvision still does the download, and
    verifies it, when ``download=True``.
    """
    folder, train_files, test_files, meta_file, label_key, names_key, tv_class = _CIFAR[name]
    base = os.path.join(os.path.expanduser(root), folder)
    needed = [os.path.join(base, f) for f in [*train_files, *test_files, meta_file]]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing and download:
        import torchvision

        logger.info("downloading %s into %s", name, root)
        try:
            getattr(torchvision.datasets, tv_class)(root=root, train=True, download=True)
        except Exception as e:  # network errors come in many types; report them as one clear SourceError
            raise SourceError(f"{name}: download into {root!r} failed ({e}); place {folder}/ there by hand") from e
        missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise SourceError(
            f"{name} not found: {missing[0]} is missing; set download=true where a network exists, or place the "
            f"official {folder}/ (from https://www.cs.toronto.edu/~kriz/) under root={root!r}"
        )

    def read(files: list[str]) -> SplitData:
        data, labels = [], []
        for f in files:
            entry = _unpickle(os.path.join(base, f))
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.extend(entry[label_key])
        images = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3) HWC
        return SplitData(labels=np.asarray(labels), images=np.ascontiguousarray(images))

    classes = list(_unpickle(os.path.join(base, meta_file))[names_key])
    return SourceData(name, classes, {"train": read(train_files), "test": read(test_files)})


@SOURCES.register("cifar10")
def load_cifar10_source(root: str, download: bool = False) -> SourceData:
    """CIFAR-10: 50,000 train / 10,000 test 32x32 images from ``root/cifar-10-batches-py``."""
    return _load_cifar("cifar10", root, download)


@SOURCES.register("cifar100")
def load_cifar100_source(root: str, download: bool = False) -> SourceData:
    """CIFAR-100 (fine labels): 50,000 train / 10,000 test 32x32 images from ``root/cifar-100-python``."""
    return _load_cifar("cifar100", root, download)


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_HOW = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist) "
    "and set dataset.root there, or set dataset.download=true where a network exists"
)


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (the MNIST format: a big-endian magic ``0x0000 08 ndim``, ``ndim`` uint32 sizes, uint8 data).

    ``path`` may be gzipped (detected by its magic bytes, whatever the name). Only unsigned-byte data (type 0x08)
    exists in (Fashion-)MNIST and only that is read.

    Raises:
        SourceError: the file is not an IDX file of unsigned bytes, or it is shorter than its header says.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SourceError(f"{path}: truncated or corrupt gzip ({e}); {FASHION_MNIST_HOW}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        magic = raw[:4].hex() or "missing"
        raise SourceError(f"{path}: not an IDX file of unsigned bytes (magic {magic}); {FASHION_MNIST_HOW}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(f"{path}: truncated IDX header; {FASHION_MNIST_HOW}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header < size:
        raise SourceError(
            f"{path}: truncated, {len(raw) - header} of {size} data bytes for shape {shape}; {FASHION_MNIST_HOW}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape)


def _find_idx(root: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


@SOURCES.register("fashion_mnist")
def load_fashion_mnist_source(root: str, download: bool = False, image_size: int = 32) -> SourceData:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images of 10 clothing classes.

    Reads the four original IDX files, gzipped or not, from ``root`` (or ``root/FashionMNIST/raw``, where
    torchvision downloads them). Each image is zero-padded to ``image_size`` (the background is 0, so padding adds
    background, not an interpolated copy: the CIFAR backbones, RandomCrop(32, pad 4) and the 4x4-patch ViTs take
    32x32 unchanged) and replicated to RGB (colour jitter, grayscale and AutoAugment of the CIFAR recipes expect
    three channels; only the stem conv sees the copies).

    Args:
        root: directory holding the idx files.
        download: fetch them with torchvision first where they are missing (needs a network).
        image_size: output side (>= 28); the 28x28 image is centred.

    Raises:
        SourceError: a file is missing, truncated or not IDX; the message names it and the two ways to get it.
    """
    root = os.path.expanduser(root)
    if image_size < 28:
        raise SourceError(f"fashion_mnist: image_size={image_size} is below the images' 28 px; use 28 or more")
    dirs = [root, os.path.join(root, "FashionMNIST", "raw")]
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]

    def locate() -> dict[str, str | None]:
        return {n: next((p for d in dirs if (p := _find_idx(d, n))), None) for n in names}

    found = locate()
    if download and None in found.values():
        import torchvision

        logger.info("downloading fashion_mnist into %s", root)
        try:
            torchvision.datasets.FashionMNIST(root=root, train=True, download=True)
            torchvision.datasets.FashionMNIST(root=root, train=False, download=True)
        except Exception as e:  # network errors come in many types; report them as one clear SourceError
            raise SourceError(f"fashion_mnist: download into {root!r} failed ({e}); {FASHION_MNIST_HOW}") from e
        found = locate()
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise SourceError(f"fashion_mnist: {os.path.join(root, missing[0])}(.gz) not found; {FASHION_MNIST_HOW}")
    pad = image_size - 28
    before, after = pad // 2, pad - pad // 2
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(found[images_name]), read_idx(found[labels_name])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
            raise SourceError(
                f"fashion_mnist: {found[images_name]} holds {images.shape} images and {found[labels_name]} "
                f"{labels.shape} labels; expected (N, 28, 28) and (N,); {FASHION_MNIST_HOW}"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise SourceError(f"fashion_mnist: {found[labels_name]} has label {labels.max()}, expected 0..9")
        grey = np.pad(images, ((0, 0), (before, after), (before, after)))  # (N, S, S), zero background
        rgb = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))  # (N, S, S, 3)
        splits[split] = SplitData(labels=labels.astype(np.int64), images=rgb)
    return SourceData("fashion_mnist", list(FASHION_MNIST_CLASSES), splits)


def _read_split_file(path: str, root: str) -> tuple[list[str], np.ndarray]:
    """Parse an OLTR split file: one ``relative/path label`` per line, whitespace-separated, no header."""
    paths, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise SourceError(f"{path}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
            try:
                labels.append(int(parts[1]))
            except ValueError as e:
                raise SourceError(f"{path}:{lineno}: label {parts[1]!r} is not an integer") from e
            paths.append(parts[0])
    if not paths:
        raise SourceError(f"split file {path} has no samples")
    return paths, np.asarray(labels, dtype=np.int64)


@SOURCES.register("imagefolder")
def load_imagefolder_source(
    root: str,
    train_file: str,
    val_file: str | None = None,
    test_file: str | None = None,
    class_names: list[str] | None = None,
) -> SourceData:
    """An image root plus OLTR split files (ImageNet-LT, Places-LT, iNaturalist-2018; METHODS.md §1.2).

    A split file path that is not absolute and does not exist as given is looked up under ``root``. Labels are
    kept as given and must be ``0..C-1`` over the union of the splits; classes are the sorted unique labels (as
    strings) unless ``class_names`` are given. Images are not read here: the dataset opens them lazily (PIL, RGB).
    The train split is already long-tailed, so the builder does not subsample it.

    Args:
        root: image root the relative paths are joined to.
        train_file: train split file (required).
        val_file: val split file, or None.
        test_file: test split file, or None.
        class_names: optional names for labels ``0..C-1``.
    """
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise SourceError(f"imagefolder root {root!r} does not exist; point `root` at the directory holding the images")
    splits: dict[str, SplitData] = {}
    for split, file in (("train", train_file), ("val", val_file), ("test", test_file)):
        if file is None:
            continue
        path = file if os.path.isabs(file) or os.path.isfile(file) else os.path.join(root, file)
        if not os.path.isfile(path):
            raise SourceError(f"{split} split file {file!r} not found (also looked in {root!r}); give its path")
        paths, labels = _read_split_file(path, root)
        splits[split] = SplitData(labels=labels, paths=paths, root=root)
    unique = np.unique(np.concatenate([s.labels for s in splits.values()]))
    if unique[0] != 0 or unique[-1] != len(unique) - 1:
        raise SourceError(
            f"imagefolder labels must be the contiguous ids 0..C-1; got {len(unique)} distinct labels in "
            f"[{unique[0]}, {unique[-1]}]; remap the labels in the split files"
        )
    if class_names is not None and len(class_names) != len(unique):
        raise SourceError(f"class_names has {len(class_names)} names for {len(unique)} labels")
    classes = list(class_names) if class_names is not None else [str(int(u)) for u in unique]
    return SourceData("imagefolder", classes, splits, given_longtail=True)


def source_names() -> list[str]:
    """Names of the registered sources."""
    return SOURCES.names()
