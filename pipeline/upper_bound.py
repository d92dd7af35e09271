"""The balanced upper bound: the CE recipe trained on a balanced training set drawn from the same pool.

How far is a long-tailed method from what the data allows? The dataset is rebuilt with ``profile: none`` and the
same image budget rules: the same source, seed, val / test carve-outs and ``n_max`` (the head class's count), so
every class gets the head class's ``n_max`` images (digits_lt: 10 × 100 = 1000 instead of 403) and the val and test
splits are exactly the long-tailed dataset's (checked by sample id). The teacher recipe named by ``upper_bound.recipe``
(``teachers.ce``) trains on it unchanged. The report's "gap closed" column is then, per shot group,
``(model − CE long-tailed) / (CE balanced − CE long-tailed)`` (``pipeline.evaluate.report``), with the groups of the
long-tailed training counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.build import BuildContext, dataset_from_config
from pipeline.config import ConfigError, DatasetConfig, TrainConfig
from pipeline.data import load_split, save_dataset
from pipeline.train.run import train_and_export

logger = logging.getLogger(__name__)


def build_balanced(dataset: DatasetConfig, lt_dir: Path, out_dir: Path) -> None:
    """Write the balanced counterpart of the dataset in ``lt_dir`` into ``out_dir`` (atomically)."""
    if dataset.source == "imagefolder":
        raise ConfigError("upper_bound: an image-folder dataset's train split is given (ImageNet-LT, Places-LT, "
                          "iNat); it has no balanced counterpart in the same pool")
    ds = dataset_from_config(dataset, profile="none")
    for split in ("val", "test"):
        lt = load_split(str(lt_dir), split)
        if not np.array_equal(np.asarray(lt.ids), np.asarray(ds.splits[split].ids)):
            raise ValueError(f"upper_bound: the balanced dataset's {split} split differs from {lt_dir}'s; rerun the "
                             "dataset stage")
    save_dataset(ds, str(out_dir))  # atomic itself
    logger.info("balanced training set: %d images (%s per class)", sum(ds.train_counts), sorted(set(ds.train_counts)))


def train_upper_bound(dataset: DatasetConfig, name: str, recipe: TrainConfig, lt_dir: Path, out_root: Path,
                      checkpoint_dir: Path, tracker: Any = None, timings_path: Path | None = None) -> dict | None:
    """Build the balanced dataset under ``out_root/dataset`` and train ``recipe`` on it into ``out_root/<name>``
    (wall times to ``timings_path``, see ``pipeline.tracking.write_timings``)."""
    bal_dir = out_root / "dataset"
    build_balanced(dataset, lt_dir, bal_dir)
    ctx = BuildContext(dataset_dir=bal_dir, data_root=out_root.parent, dataset=dataset)
    return train_and_export(recipe, ctx, out_root / name, checkpoint_dir, tracker, timings_path=timings_path)
