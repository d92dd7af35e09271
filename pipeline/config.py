"""Schemas of each ``params.yaml`` section; loading one validates keys, types and registry names.

Stage scripts read only their own section (``pipeline.build.load_section``). An unknown key or a wrong type fails
here (``parse_schema``), an unknown registry name in ``pipeline.build`` (which owns the registries), each with one
line naming the key and the valid choices (``ConfigError``). This module imports nothing of the pipeline, so the
dependency runs one way: build → config. The YAML itself is written by Hydra from ``conf/`` (``dvc exp run -S
...``); this module never composes, it parses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A params.yaml section is invalid; the message names the key and what would be valid."""


@dataclass
class DatasetConfig:
    """The ``dataset`` section (see conf/dataset/*.yaml)."""

    name: str = "digits_lt"
    source: str = "digits"
    root: str | None = None
    download: bool = False
    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    num_classes: int = 10  # synthetic only
    images_per_class: int = 200  # synthetic only
    image_size: int = 32
    profile: str = "exp"
    imbalance_factor: float = 10.0
    n_max: int | None = None
    val_per_class: int = 0
    test_per_class: int = 0
    many: int = 100
    few: int = 20
    seed: int = 0
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    hflip: bool = True  # training views flip horizontally; false for classes that are not mirror symmetric (digits)


@dataclass
class OptimizerConfig:
    """``lr`` is the lr of the whole batch; with ``lr_base_batch`` it is scaled to ``lr · batch_size / lr_base_batch``
    (the linear scaling rule, e.g. DeiT's ``5e-4 · batch / 512``)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    lr_base_batch: int | None = None


@dataclass
class UpdaterConfig:
    name: str = "standard"
    rho: float = 0.05
    rho_schedule: str = "constant"
    rho_args: dict[str, Any] = field(default_factory=dict)
    freeze_bn_second_pass: bool = False


@dataclass
class ModelConfig:
    backbone: str = "cifar_resnet8"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint_file: str | None = None
    head: str = "linear"
    head_args: dict[str, Any] = field(default_factory=dict)
    neck_dim: int | None = None
    normalize_features: bool = False
    distilled: bool = False  # a distilled ViT: a second head (same name and args) on the DIST token


@dataclass
class InputConfig:
    """How a model's images are prepared (side, normalisation); None takes the dataset's value."""

    size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class TrainConfig:
    """One ``teachers.<name>`` or ``students.<name>`` entry: a Method, its model, data pipeline and schedule."""

    method: str = "erm"
    method_args: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: str = "ce"
    loss_args: dict[str, Any] = field(default_factory=dict)
    class_weight: str = "none"  # none | reweight | drw
    drw_epoch: int = 160
    cb_beta: float = 0.9999
    sampler: str = "instance"
    sampler_args: dict[str, Any] = field(default_factory=dict)
    transforms: list[str] = field(default_factory=lambda: ["standard"])
    transform_args: dict[str, Any] = field(default_factory=dict)
    input: InputConfig = field(default_factory=InputConfig)
    epochs: int = 10
    batch_size: int = 128
    drop_last: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: str = "cosine"
    lr_args: dict[str, Any] = field(default_factory=dict)
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    amp: str = "auto"
    grad_clip: float | None = None
    select: str = "last"
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None  # also checkpoint every N updates inside an epoch; None/0: per epoch only
    nproc: int = 1  # data-parallel processes: > 1 reruns the stage under torchrun (docs/distributed.md)
    sync_bn: bool = False  # with nproc > 1: SyncBatchNorm for the trained BatchNorm layers (CUDA only)


@dataclass
class RebalanceConfig:
    """One ``rebalance.<model>-<method>`` entry."""

    model: str = "teachers/ce"
    method: str = "crt"  # crt | lws | ncm | tau_norm
    tau_select: str = "val"  # val | train_balanced | learn (tau_norm)
    taus: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])
    ncm_feat: str = "cl2n"
    ncm_dist: str = "l2"
    update_bn: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class EncoderConfig:
    type: str = "teacher"  # teacher | timm | open_clip
    model: str = "ce"  # teacher name (data/teachers/<model>) or a timm / open_clip model id
    checkpoint_file: str | None = None  # local weights (timm file; open_clip file or tag)


@dataclass
class IndexConfig:
    """One ``index.<name>`` entry: a retrieval memory over frozen-encoder embeddings of the train split."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    kind: str = "hnsw"  # hnsw | exact
    metric: str = "cosine"  # cosine | l2 | ip
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    k: int = 30
    split: str = "train"
    batch_size: int = 256


@dataclass
class MemoryConfig:
    """One ``memory.<name>`` entry: a trained RAC student scored against a changed memory, weights untouched."""

    model: str = "rac"  # students/<model>
    add_splits: list[str] = field(default_factory=list)  # labelled splits whose images join the memory (val)
    remove_classes: list[int] = field(default_factory=list)  # classes whose entries leave the memory
    remove_ids: list[int] = field(default_factory=list)  # single entries (sample ids) that leave the memory


@dataclass
class UpperBoundConfig:
    """The ``upper_bound`` section: a teacher recipe trained on the balanced counterpart of the training set."""

    recipe: str = "ce"  # teachers.<recipe>: the CE recipe whose long-tailed run is the baseline of "gap closed"


@dataclass
class SeedsConfig:
    """The ``seeds`` section: seed replicas of every trained model (the primary run is replica 0).

    Replica K (K > 0) trains every teacher, student, rebalanced model and the upper bound again with its seed + K,
    under ``data/seeds/K/``; the report gives mean ± std over the primary run and the replicas.
    """

    replicas: list[int] = field(default_factory=list)


@dataclass
class EvaluateConfig:
    ensembles: dict[str, list[str]] = field(default_factory=dict)
    plots_top: int = 8


SCHEMAS: dict[str, type] = {
    "dataset": DatasetConfig,
    "teachers": TrainConfig,
    "students": TrainConfig,
    "index": IndexConfig,
    "rebalance": RebalanceConfig,
    "memory": MemoryConfig,
    "upper_bound": UpperBoundConfig,
    "seeds": SeedsConfig,
    "evaluate": EvaluateConfig,
}


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root (or compose it: dvc exp run)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix it or compose it again "
                          "(dvc exp run)") from None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must be a mapping of sections (dataset, teachers, ...), got "
                          f"{type(params).__name__}")
    return params


def _schema_at(schema: type, path: list[str]) -> type:
    """The dataclass that holds the key at ``path`` (for the list of valid keys in an error)."""
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(schema)}
        sub = fields[part].default_factory if part in fields else None
        if sub is None or not dataclasses.is_dataclass(sub):
            break
        schema = sub
    return schema


def parse_schema(schema: type, raw: Any, where: str) -> Any:
    """Check the keys and types of ``raw`` against the dataclass ``schema``; return a plain dataclass instance.

    Registry names and ranges are checked by ``pipeline.build.to_schema``, which calls this first.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(raw))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", "?")
        msg = str(exc).splitlines()[0]
        if "not in" in msg:
            valid = ", ".join(f.name for f in dataclasses.fields(_schema_at(schema, str(key).split(".")[:-1])))
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {valid}") from None
        raise ConfigError(f"{where}.{key}: {msg}") from None


def raw_section(section: str, name: str | None = None, params_path: str | Path = "params.yaml") -> tuple[Any, str]:
    """``params.yaml[section]`` (or ``[section][name]``) unparsed, and the dotted place it came from."""
    params = read_params(params_path)
    if section not in SCHEMAS:
        raise ConfigError(f"unknown params section {section!r}; valid: {', '.join(SCHEMAS)}")
    raw = params.get(section, {})
    where = section
    if name is not None:
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{section} must be a mapping of named entries, got {type(raw).__name__}")
        if name not in (raw or {}):
            raise ConfigError(f"{section}.{name} is not in {params_path}; defined: {', '.join(raw or {}) or 'none'}")
        raw, where = raw[name], f"{section}.{name}"
    return raw, where


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
