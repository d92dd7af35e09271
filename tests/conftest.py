"""Shared test fixtures: an offline session, a tiny long-tailed synthetic dataset on disk and its BuildContext.

The dataset is written once per session with ``pipeline.data`` (synthetic source, 4 classes, 16x16 images,
IF 4, n_max 12; 4 val and 4 test images per class), so engine tests can build real loaders and methods through
``pipeline.build`` in well under a second per epoch on the CPU.
"""

from __future__ import annotations

import os

# Set before anything imports the tracking module or huggingface_hub (both read the environment at import).
os.environ["LONGTAIL_TRACKING"] = "off"
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_CLASSES = 4
TINY_SIZE = 16


@pytest.fixture(scope="session", autouse=True)
def _offline_session() -> None:
    """Keep the whole session offline and untracked, on one intra-op thread.

    Tiny CPU models are dominated by thread synchronisation: on a loaded 2-core machine a cifar_resnet8 step takes
    ~0.9 s with 2 threads and ~0.015 s with 1, so the tests pin torch to one thread.
    """
    import torch

    os.environ["LONGTAIL_TRACKING"] = "off"
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dataset_config():
    """The ``dataset`` section matching :func:`tiny_dataset_dir`."""
    from pipeline.config import DatasetConfig

    return DatasetConfig(
        name="tiny",
        source="synthetic",
        num_classes=TINY_CLASSES,
        images_per_class=24,
        image_size=TINY_SIZE,
        profile="exp",
        imbalance_factor=4.0,
        n_max=12,
        val_per_class=4,
        test_per_class=4,
        many=10,
        few=4,
        seed=0,
    )


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_config) -> Path:
    """A saved long-tailed dataset (``manifest.json`` + ``{train,val,test}.npz``); train counts [12, 7, 4, 3]."""
    from pipeline.data import build_longtail, load_source, save_dataset

    d = tiny_dataset_config
    source = load_source(
        "synthetic",
        num_classes=d.num_classes,
        images_per_class=d.images_per_class,
        image_size=d.image_size,
        seed=d.seed,
    )
    ds = build_longtail(
        source,
        profile=d.profile,
        imbalance_factor=d.imbalance_factor,
        n_max=d.n_max,
        val_per_class=d.val_per_class,
        test_per_class=d.test_per_class,
        seed=d.seed,
        many=d.many,
        few=d.few,
    )
    out = tmp_path_factory.mktemp("data") / "dataset"
    save_dataset(ds, str(out))
    return out


@pytest.fixture
def build_ctx(tiny_dataset_dir: Path, tiny_dataset_config, tmp_path: Path):
    """A fresh :class:`pipeline.build.BuildContext` whose ``data_root`` is a per-test tmp dir (for teachers)."""
    from pipeline.build import BuildContext

    return BuildContext(dataset_dir=tiny_dataset_dir, data_root=tmp_path / "data", dataset=tiny_dataset_config)


@pytest.fixture
def make_train_config() -> Callable[..., object]:
    """Factory of a tiny, CPU-only :class:`pipeline.config.TrainConfig` (ERM, cifar_resnet8, constant lr)."""
    from pipeline.config import ModelConfig, OptimizerConfig, TrainConfig, UpdaterConfig

    def make(**overrides: object) -> TrainConfig:
        kw: dict = dict(
            method="erm",
            model=ModelConfig(backbone="cifar_resnet8", head="linear"),
            loss="ce",
            epochs=3,
            batch_size=8,
            optimizer=OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4),
            lr_schedule="constant",
            updater=UpdaterConfig(),
            sampler="instance",
            transforms=["standard"],
            amp="off",
            device="cpu",
            num_workers=0,
            seed=3,
        )
        kw.update(overrides)
        return TrainConfig(**kw)

    return make


def with_reads(params: dict) -> dict:
    """``params`` with its ``reads`` section (dvc.yaml's deps slots) derived again from its entries, as composing
    ``conf/`` derives it: a test that edits the composed entries must not keep the stale slots."""
    from pipeline.compose import stage_reads

    return {**params, "reads": stage_reads(params)} if params else params


@pytest.fixture(scope="session")
def copy_repo() -> Callable[[Path, dict], Path]:
    """``copy_repo(dst, params)``: the working tree (tracked and untracked, not ignored files) copied to ``dst`` as
    its own git + DVC repository without ``dvc.lock``, with ``params`` as its ``params.yaml``."""
    import shutil
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[1]

    def copy(dst: Path, params: dict) -> Path:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split()
        for f in files:
            if (root / f).is_file():
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / f, dst / f)
        (dst / "dvc.lock").unlink(missing_ok=True)
        subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
        params = with_reads(params)
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return dst

    return copy
