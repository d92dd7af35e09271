"""Data: sources, long-tail profiles and splits, samplers, transforms and the torch dataset."""

from pipeline.data.datasets import (
    ImageDataset,
    LongTailDataset,
    build_longtail,
    collate,
    load_manifest,
    load_split,
    plot_class_counts,
    save_dataset,
)
from pipeline.data.longtail import balanced_split, longtail_counts, shot_groups, subsample_indices
from pipeline.data.samplers import SAMPLERS, EpochSampler, create_sampler
from pipeline.data.sources import SOURCES, SourceData, SourceError, SplitData, load_source
from pipeline.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    DEFAULT_MEAN,
    DEFAULT_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORMS,
    create_transform,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLERS",
    "SOURCES",
    "TRANSFORMS",
    "EpochSampler",
    "ImageDataset",
    "LongTailDataset",
    "SourceData",
    "SourceError",
    "SplitData",
    "balanced_split",
    "build_longtail",
    "collate",
    "create_sampler",
    "create_transform",
    "load_manifest",
    "load_source",
    "load_split",
    "longtail_counts",
    "plot_class_counts",
    "save_dataset",
    "shot_groups",
    "subsample_indices",
]
