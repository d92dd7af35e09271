"""The long-tailed dataset: building it from a source, saving/loading it, and the torch ``Dataset`` over a split.

Building (``build_longtail``), per source kind:

* no test split (digits, synthetic): a balanced test set (``test_per_class``) and then a balanced val set
  (``val_per_class``) are carved from the pool first; the long-tailed train set is subsampled from the rest with
  ``longtail_counts(n_max or min-available, ...)`` and the official LDAM-DRW selection (``subsample_indices``).
* official test split (CIFAR-10/100): the train set is subsampled from the full official train set exactly as the
  official code does (``n_max`` defaults to ``len(train) / C`` = 5000 / 500, seed = ``rand_number``), so the
  selection is bit-identical to LDAM-DRW / PaCo / DeiT-LT; val is carved (balanced, possibly 0 per class) from the
  train images that not even the balanced counterpart (``n_max`` per class) selects, so it is the same for every
  profile; test is the official balanced test set. The official head class uses all
  of its images, so a non-empty val set needs ``n_max <= len(train)/C - val_per_class`` (an error says so).
* given long-tailed splits (imagefolder, ImageNet-LT style): kept as they are, profile recorded as ``given``.

Every sample carries a stable int64 id: its index in the source split it came from, offset so that ids are unique
across source splits (source train: ``i``; source val: ``len(train) + i``; source test:
``len(train) + len(val) + i``). Ids do not change with the profile, so features and retrieval memories can be
joined across runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.longtail import balanced_split, longtail_counts, shot_groups, subsample_indices
from pipeline.data.sources import SPLITS, SourceData, SplitData

logger = logging.getLogger(__name__)


@dataclass
class LongTailDataset:
    """A built long-tailed dataset: the three splits plus what the manifest records."""

    source: str
    classes: list[str]
    splits: dict[str, SplitData]
    train_counts: list[int]
    shot_groups: list[str]
    profile: str
    imbalance_factor: float | None
    n_max: float | None
    seed: int
    many: int = 100
    few: int = 20
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def manifest(self) -> dict:
        """JSON-serialisable description of the dataset (``manifest.json``)."""
        counts = np.asarray(self.train_counts)
        nonzero = counts[counts > 0]
        obtained = float(nonzero.max() / nonzero.min()) if len(nonzero) else None
        return {
            "source": self.source,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "train_counts": [int(n) for n in self.train_counts],
            "shot_groups": list(self.shot_groups),
            "shot_group_sizes": {g: self.shot_groups.count(g) for g in ("many", "medium", "few")},
            "thresholds": {"many": self.many, "few": self.few},
            "profile": self.profile,
            "imbalance_factor_requested": self.imbalance_factor,
            "imbalance_factor": obtained,
            "n_max": self.n_max,
            "seed": self.seed,
            "split_sizes": {name: len(s) for name, s in self.splits.items()},
            **self.extra,
        }


def _with_ids(split: SplitData, offset: int) -> SplitData:
    return SplitData(split.labels, split.images, split.paths, split.root, ids=offset + np.arange(len(split)))


def build_longtail(
    source: SourceData,
    *,
    profile: str = "exp",
    imbalance_factor: float = 100.0,
    n_max: float | None = None,
    val_per_class: int = 0,
    test_per_class: int = 0,
    seed: int = 0,
    many: int = 100,
    few: int = 20,
) -> LongTailDataset:
    """Build the long-tailed train / balanced val / balanced test splits of a source (see the module docstring).

    Args:
        source: a loaded source.
        profile: long-tail profile (``exp``, ``step``, ``pareto``, ``none``); ``given`` keeps the train split as is.
            Ignored (recorded as ``given``) for sources whose train split is already long-tailed.
        imbalance_factor: IF = n_max / n_min.
        n_max: images of the head class (class 0). Default: the fewest images any class has available
            (``len(train) / C`` for the balanced CIFAR train sets, as in the official code).
        val_per_class: balanced val images per class (carved from the pool; 0 = no val split content).
        test_per_class: balanced test images per class, used only for sources without a test split.
        seed: seed of the subsampling (the official ``rand_number``) and of the carve-outs.
        many: many-shot threshold (count > many).
        few: few-shot threshold (count < few).

    Returns:
        The dataset, with ``train``, ``val`` and ``test`` splits (``val`` may be empty).

    Raises:
        ValueError: if the source lacks a train split, a source without test split gets ``test_per_class`` 0, or
            a class has too few images for the requested carve-outs and profile.
    """
    if "train" not in source.splits:
        raise ValueError(f"source {source.name!r} has no train split (splits: {sorted(source.splits)})")
    C = source.num_classes
    offsets, total = {}, 0
    for name in SPLITS:
        if name in source.splits:
            offsets[name] = total
            total += len(source.splits[name])
    pool = _with_ids(source.splits["train"], offsets["train"])
    splits: dict[str, SplitData] = {}

    def carve(split: SplitData, per_class: int, stream: int) -> tuple[SplitData, SplitData]:
        # independent streams per carve-out, so the test set does not move when val_per_class changes
        taken, rest = balanced_split(split.labels, per_class, seed=[seed, stream], num_classes=C)
        return split.subset(taken), split.subset(rest)

    def lt_counts(default_n_max: float) -> list[int]:
        return longtail_counts(n_max if n_max is not None else default_n_max, C, imbalance_factor, profile)

    if source.given_longtail or profile == "given":
        profile = "given"
        splits["train"] = pool
        for name in ("val", "test"):
            if name in source.splits:
                splits[name] = _with_ids(source.splits[name], offsets[name])
        if "val" not in splits:
            splits["val"], splits["train"] = carve(pool, val_per_class, 2) if val_per_class else (pool.subset([]), pool)
        if "test" not in splits:
            if not test_per_class:
                raise ValueError(f"source {source.name!r} has no test split; set test_per_class > 0 to carve one")
            splits["test"], splits["train"] = carve(splits["train"], test_per_class, 1)
    elif "test" in source.splits:
        # official order: subsample the full train set first, then carve val from what was not selected
        available = np.bincount(pool.labels, minlength=C)
        head = len(pool) / C if available.min() == available.max() else int(available.min())
        counts = lt_counts(head)
        chosen = subsample_indices(pool.labels, counts, seed)
        # Val comes from the images that not even the balanced counterpart (``n_max`` per class, same seed) draws.
        # LDAM-DRW's selection shuffles each class once and keeps a prefix, so every profile's train split is a
        # prefix of the same order: this val is disjoint from all of them and identical across profiles (the
        # balanced upper bound is scored on the same val and test).
        top = longtail_counts(n_max if n_max is not None else head, C, imbalance_factor, "none")
        reserved = subsample_indices(pool.labels, top, seed) if val_per_class else chosen
        rest_mask = np.ones(len(pool), dtype=bool)
        rest_mask[chosen] = False
        rest_mask[reserved] = False
        rest = pool.subset(np.flatnonzero(rest_mask))
        splits["train"] = pool.subset(chosen)
        left = np.bincount(rest.labels, minlength=C)
        if val_per_class and left.min() < val_per_class:
            c = int(left.argmin())
            raise ValueError(
                f"val_per_class={val_per_class} but class {c} has only {left[c]} train images left after the "
                f"long-tail selection (n_max={n_max}); set val_per_class=0 (the official protocol has no val set) "
                f"or n_max <= {int(available.min()) - val_per_class} (departs from the official counts)"
            )
        splits["val"] = carve(rest, val_per_class, 2)[0] if val_per_class else pool.subset([])
        splits["test"] = _with_ids(source.splits["test"], offsets["test"])
    else:
        if not test_per_class:
            raise ValueError(f"source {source.name!r} has no test split; set test_per_class > 0 to carve one")
        splits["test"], rest = carve(pool, test_per_class, 1)
        splits["val"], rest = carve(rest, val_per_class, 2) if val_per_class else (pool.subset([]), rest)
        available = np.bincount(rest.labels, minlength=C)
        counts = lt_counts(int(available.min()))
        splits["train"] = rest.subset(subsample_indices(rest.labels, counts, seed))

    train_counts = np.bincount(splits["train"].labels, minlength=C).tolist()
    empty = [c for c, n in enumerate(train_counts) if n == 0]
    if empty:
        names = ", ".join(repr(source.classes[c]) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(
            f"{len(empty)} class(es) have no training images after the splits ({names}): every class needs at "
            f"least one; add images of them to the train split, or lower val_per_class / test_per_class"
        )
    ds = LongTailDataset(
        source=source.name,
        classes=list(source.classes),
        splits={name: splits[name] for name in SPLITS},
        train_counts=train_counts,
        shot_groups=shot_groups(train_counts, many, few),
        profile=profile,
        imbalance_factor=None if profile == "given" else float(imbalance_factor),
        n_max=None if profile == "given" else (float(n_max) if n_max is not None else float(max(train_counts))),
        seed=seed,
        many=many,
        few=few,
    )
    logger.info(
        "built %s: %d classes, train %d / val %d / test %d, groups %s",
        source.name,
        C,
        len(ds.splits["train"]),
        len(ds.splits["val"]),
        len(ds.splits["test"]),
        ds.manifest()["shot_group_sizes"],
    )
    return ds


def _remove_stale(out_dir: str) -> None:
    """Remove ``.<name>.tmp<pid>`` / ``.<name>.old<pid>`` siblings of ``out_dir`` left by killed processes.

    (``pipeline.io.remove_stale`` does the same for the other stages; the dataset stage does not depend on it.)
    """
    parent, name = os.path.split(out_dir)
    for entry in os.listdir(parent):
        m = re.fullmatch(rf"\.{re.escape(name)}\.(?:tmp|old)(\d+)", entry)
        if m is None or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)
            continue  # a live process is writing it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        logger.info("removing %s, left by an interrupted write", os.path.join(parent, entry))
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def save_dataset(ds: LongTailDataset, out_dir: str, plot: bool = False) -> None:
    """Write ``manifest.json`` and ``{train,val,test}.npz`` (and ``class_counts.png``) into ``out_dir`` atomically.

    Files are written into a temporary directory next to ``out_dir`` and renamed into place when complete; an
    existing ``out_dir`` is replaced only then, so an interruption leaves the old output or none (and the next call
    removes the temporary directories that an interrupted one left).
    Each npz holds ``labels``, ``ids`` and either ``images`` (N, H, W, 3) uint8 or ``paths`` + ``root``.

    Args:
        ds: the dataset.
        out_dir: the output directory.
        plot: also write ``class_counts.png`` (:func:`plot_class_counts`).
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(out_dir)
    base = os.path.basename(out_dir)
    tmp = os.path.join(parent, f".{base}.tmp{os.getpid()}")
    old = os.path.join(parent, f".{base}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        for name, split in ds.splits.items():
            arrays = {"labels": split.labels, "ids": split.ids if split.ids is not None else np.arange(len(split))}
            if split.images is not None:
                arrays["images"] = split.images
            else:
                arrays["paths"] = np.asarray(split.paths or [], dtype=str)
                arrays["root"] = np.asarray(split.root or "")
            np.savez(os.path.join(tmp, f"{name}.npz"), **arrays)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(ds.manifest(), f, indent=2)
        if plot:
            plot_class_counts(ds.train_counts, ds.shot_groups, os.path.join(tmp, "class_counts.png"))
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        if os.path.exists(old) and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(dataset_dir: str) -> dict:
    """The ``manifest.json`` of a saved dataset."""
    with open(os.path.join(dataset_dir, "manifest.json")) as f:
        return json.load(f)


def load_split(dataset_dir: str, split: str) -> SplitData:
    """Load one saved split (``train``, ``val`` or ``test``) as a :class:`SplitData` with ids."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    path = os.path.join(dataset_dir, f"{split}.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; run the dataset stage first")
    try:  # allow_pickle=False: an object array (which would unpickle, and could run code) is refused
        with np.load(path, allow_pickle=False) as z:
            if "images" in z:
                return SplitData(labels=z["labels"], images=z["images"], ids=z["ids"])
            return SplitData(labels=z["labels"], paths=z["paths"].tolist(), root=str(z["root"]) or None, ids=z["ids"])
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a valid dataset split ({reason}); rebuild it with the dataset stage") from None


def plot_class_counts(counts: Sequence[int], groups: Sequence[str], path: str) -> None:
    """Bar chart of train images per class (log y), bars coloured by shot group; saved as PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(4.0, min(16.0, len(counts) * 0.15)), 3.0))
    x = np.arange(len(counts))
    ax.bar(x, counts, width=1.0, color=[colours.get(g, "gray") for g in groups])
    ax.set_yscale("log")
    ax.set_xlabel("class")
    ax.set_ylabel("train images")
    for g, c in colours.items():
        ax.bar([], [], color=c, label=f"{g} ({list(groups).count(g)})")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


class ImageDataset(Dataset):
    """A split as a torch dataset returning ``(views, label, index)``, one view per transform.

    ``index`` is the position in the split (as classifier-balancing's ``LT_Dataset`` returns it). In-memory uint8
    images are passed to the transforms as HWC arrays; on-disk images are opened lazily with PIL as RGB.

    A key may also be ``(index, seed)`` (a training sampler's per-sample seeds, ``pipeline.data.samplers``): the
    transforms then draw from torch, Python and numpy RNGs seeded with ``seed``, and the caller's RNG states are
    restored afterwards, so the augmentation of a sample depends on its seed only (not on the DataLoader worker,
    nor on what the process drew before).

    Args:
        split: the split.
        transforms: one callable per view (e.g. ``[query, key]`` for PaCo; ``[test]`` for evaluation).
    """

    def __init__(self, split: SplitData, transforms: Sequence[Callable]) -> None:
        if split.images is None and split.paths is None:
            raise ValueError("split has neither images nor paths")
        if not transforms:
            raise ValueError("ImageDataset needs at least one transform")
        self.split = split
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int):
        """The raw image at ``index``: an HWC uint8 array or a PIL RGB image."""
        if self.split.images is not None:
            return self.split.images[index]
        from PIL import Image

        path = os.path.join(self.split.root or "", self.split.paths[index])
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} does not exist; fix its split-file line or the root") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot read image {path} ({reason}); replace it or remove its line from the split "
                             "file") from None

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self.load(index)
        with _seeded(seed):
            views = tuple(t(img) for t in self.transforms)
        return views, int(self.split.labels[index]), int(index)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch, Python and numpy from ``seed`` inside the block and restore the caller's states after it."""
    if seed is None:
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (fork_rng restores only it): the same stream as torch.manual_seed, which also
        # queues the CUDA generators and costs ~120 us a call against ~1 us, per sample (measured on the CPU build).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def collate(batch: list[tuple[tuple[torch.Tensor, ...], int, int]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Stack ``ImageDataset`` items: ``images`` is a list with one (B, C, H, W) tensor per view."""
    views, labels, index = zip(*batch, strict=True)
    return {
        "images": [torch.stack(v) for v in zip(*views, strict=True)],
        "labels": torch.as_tensor(labels, dtype=torch.long),
        "index": torch.as_tensor(index, dtype=torch.long),
    }
