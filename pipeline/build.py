"""The only config → object adapter: networks, methods, losses, optimizers, updaters, schedules, data loaders.

Runtime facts (class counts, feature dimensions, teacher paths) are injected here, never repeated in YAML.
Everything else in ``pipeline/`` takes explicit arguments and never sees a config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.config import (
    SCHEMAS,
    ConfigError,
    DatasetConfig,
    InputConfig,
    ModelConfig,
    RebalanceConfig,
    SeedsConfig,
    TrainConfig,
    parse_schema,
    raw_section,
)
from pipeline.data import (
    SAMPLERS,
    SOURCES,
    TRANSFORMS,
    ImageDataset,
    collate,
    create_sampler,
    create_transform,
    load_manifest,
    load_split,
)
from pipeline.losses import LOSSES, class_weight_schedule, create_loss
from pipeline.models.factory import is_backbone
from pipeline.models.heads import HEADS
from pipeline.models.network import Network, load_network
from pipeline.optim.sam import SAM
from pipeline.optim.schedules import LR_SCHEDULES, RHO_SCHEDULES, create_lr_schedule, create_rho_schedule
from pipeline.registry import Registry
from pipeline.train import distributed
from pipeline.train.distributed import local_batch_size
from pipeline.train.method import Method
from pipeline.train.updaters import UPDATERS

logger = logging.getLogger(__name__)

METHOD_BUILDERS: Registry[Method] = Registry("method")
PROFILES = ("exp", "step", "pareto", "none")
WEIGHT_RULES = ("none", "reweight", "drw")
REBALANCE_METHODS = ("crt", "lws", "ncm", "tau_norm")


@dataclass
class BuildContext:
    """Runtime facts a builder may inject.

    Attributes:
        dataset_dir: the dataset stage's output (``data/dataset``).
        data_root: where other stages' outputs live (``data``): teachers are ``data_root/teachers/<name>``.
        dataset: the dataset section (image size, mean, std).
    """

    dataset_dir: Path
    data_root: Path
    dataset: DatasetConfig

    @property
    def manifest(self) -> dict:
        if not hasattr(self, "_manifest"):
            self._manifest = load_manifest(str(self.dataset_dir))
        return self._manifest

    @property
    def class_counts(self) -> list[int]:
        return self.manifest["train_counts"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]


# --- validation of registry names (called by pipeline.config at load time) -------------------------------------
def _check(where: str, key: str, value: str, valid: list[str] | tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{where}.{key}: unknown value {value!r}; valid: {', '.join(valid)}")


def _validate_train(cfg: TrainConfig, where: str) -> None:
    _check(where, "method", cfg.method, METHOD_BUILDERS.names())
    if not is_backbone(cfg.model.backbone):
        raise ConfigError(f"{where}.model.backbone: unknown backbone {cfg.model.backbone!r}; registered here: "
                          "cifar_resnet8, cifar_resnet20, cifar_resnet32, or any timm model name")
    _check(where, "model.head", cfg.model.head, HEADS.names())
    _check(where, "loss", cfg.loss, LOSSES.names())
    _check(where, "class_weight", cfg.class_weight, WEIGHT_RULES)
    _check(where, "sampler", cfg.sampler, SAMPLERS.names())
    for t in cfg.transforms:
        _check(where, "transforms", t, TRANSFORMS.names())
    _check(where, "lr_schedule", cfg.lr_schedule, LR_SCHEDULES.names())
    _check(where, "updater.name", cfg.updater.name, UPDATERS.names())
    _check(where, "updater.rho_schedule", cfg.updater.rho_schedule, RHO_SCHEDULES.names())
    _check(where, "optimizer.name", cfg.optimizer.name, ("sgd", "adamw"))
    _check(where, "amp", cfg.amp, ("auto", "bf16", "fp16", "off"))
    _check(where, "select", cfg.select, ("last", "best_val"))
    if cfg.device != "auto" and not cfg.device.startswith(("cpu", "cuda")):
        raise ConfigError(f"{where}.device: unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:<index>")
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.nproc < 1:
        raise ConfigError(f"{where}.nproc must be >= 1 (1: one process; N: torchrun with N ranks), got {cfg.nproc}")
    if cfg.batch_size % cfg.nproc:
        raise ConfigError(f"{where}.batch_size {cfg.batch_size} is not divisible by nproc {cfg.nproc}: each rank "
                          "loads batch_size / nproc samples per update")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 0:
        raise ConfigError(f"{where}.checkpoint_every must be null or 0 (once per epoch) or a number of updates >= 1, "
                          f"got {cfg.checkpoint_every}")


def validate_names(obj: Any, where: str) -> None:
    """Check every registry name and range in a loaded section; raise ConfigError naming the key."""
    if isinstance(obj, TrainConfig):
        _validate_train(obj, where)
    elif isinstance(obj, DatasetConfig):
        _check(where, "source", obj.source, SOURCES.names())
        _check(where, "profile", obj.profile, PROFILES)
        if obj.imbalance_factor < 1:
            raise ConfigError(f"{where}.imbalance_factor must be >= 1 (n_max / n_min), got {obj.imbalance_factor}")
        if obj.few > obj.many:
            raise ConfigError(f"{where}: few ({obj.few}) must not exceed many ({obj.many})")
    elif isinstance(obj, RebalanceConfig):
        _check(where, "method", obj.method, REBALANCE_METHODS)
        _check(where, "tau_select", obj.tau_select, ("val", "train_balanced", "learn"))
        _check(where, "ncm_feat", obj.ncm_feat, ("un", "l2n", "cl2n"))
        _check(where, "ncm_dist", obj.ncm_dist, ("l2", "cos"))
        if "/" not in obj.model:
            raise ConfigError(f"{where}.model must be '<teachers|students>/<name>', got {obj.model!r}")
        _validate_train(obj.train, f"{where}.train")
    elif isinstance(obj, SeedsConfig):
        if any(k < 1 for k in obj.replicas) or len(set(obj.replicas)) != len(obj.replicas):
            raise ConfigError(f"{where}.replicas must be distinct seed offsets >= 1 (0 is the primary run), got "
                              f"{obj.replicas}")


def to_schema(schema: type, raw: Any, where: str) -> Any:
    """Parse ``raw`` into ``schema`` (keys, types) and check its registry names and ranges; raise ConfigError."""
    obj = parse_schema(schema, raw, where)
    validate_names(obj, where)
    return obj


def load_section(section: str, name: str | None = None, params_path: str | Path = "params.yaml") -> Any:
    """Load and validate ``params.yaml[section]`` (or ``[section][name]`` for the named collections)."""
    raw, where = raw_section(section, name, params_path)
    return to_schema(SCHEMAS[section], raw, where)


# --- data -------------------------------------------------------------------------------------------------------
def dataset_from_config(cfg: DatasetConfig, profile: str | None = None):
    """Load ``cfg``'s source and build its long-tailed dataset (``profile`` overrides ``cfg.profile``)."""
    from pipeline.data import build_longtail, load_source

    kwargs = {"digits": dict(image_size=cfg.image_size),
              "synthetic": dict(num_classes=cfg.num_classes, images_per_class=cfg.images_per_class,
                                image_size=cfg.image_size, seed=cfg.seed),
              "cifar10": dict(root=cfg.root, download=cfg.download),
              "cifar100": dict(root=cfg.root, download=cfg.download),
              "fashion_mnist": dict(root=cfg.root, download=cfg.download, image_size=cfg.image_size),
              "imagefolder": dict(root=cfg.root, train_file=cfg.train_file, val_file=cfg.val_file,
                                  test_file=cfg.test_file)}[cfg.source]
    source = load_source(cfg.source, **kwargs)
    return build_longtail(source, profile=profile or cfg.profile, imbalance_factor=cfg.imbalance_factor,
                          n_max=cfg.n_max, val_per_class=cfg.val_per_class, test_per_class=cfg.test_per_class,
                          seed=cfg.seed, many=cfg.many, few=cfg.few)


# --- models -----------------------------------------------------------------------------------------------------
def resolve_input(cfg: InputConfig | None, dataset: DatasetConfig) -> dict:
    """A model's preprocessing ``{"size", "mean", "std"}``: its own settings, else the dataset's."""
    cfg = cfg or InputConfig()
    return {"size": cfg.size or dataset.image_size, "mean": list(cfg.mean or dataset.mean),
            "std": list(cfg.std or dataset.std)}


def network_spec(model: ModelConfig, num_classes: int, neck_dim: int | None = None,
                 input_spec: dict | None = None) -> dict:
    """The ``model.json`` spec of a network (see ``pipeline.models.network``)."""
    backbone = {"name": model.backbone, **model.backbone_args}
    if model.pretrained or model.checkpoint_file:
        backbone.update(pretrained=model.pretrained, checkpoint_file=model.checkpoint_file)
    dim = neck_dim if neck_dim is not None else model.neck_dim
    head = {"name": model.head, **model.head_args}
    spec = {"backbone": backbone, "neck": {"dim": dim} if dim else None, "head": head,
            "normalize_features": model.normalize_features, "num_classes": num_classes}
    if model.distilled:
        spec["dist_head"] = dict(head)
    if input_spec is not None:
        spec["input"] = dict(input_spec)
    return spec


def _spec(cfg: TrainConfig, ctx: BuildContext, neck_dim: int | None = None) -> dict:
    return network_spec(cfg.model, ctx.num_classes, neck_dim, resolve_input(cfg.input, ctx.dataset))


def model_dir(ctx: BuildContext, ref: str) -> Path:
    """``teachers/<name>`` or ``students/<name>`` → its output directory; a clear error when it is missing."""
    path = ctx.data_root / ref
    if not (path / "model.json").is_file():
        raise ConfigError(f"model {ref!r} not found at {path}: no stage produces it (check the name in params.yaml)")
    return path


@METHOD_BUILDERS.register("erm")
def _build_erm(cfg: TrainConfig, ctx: BuildContext) -> Method:
    from pipeline.train.methods import ERM

    counts = ctx.class_counts
    loss = create_loss(cfg.loss, class_counts=counts, **cfg.loss_args)

    def weights(epoch: int) -> torch.Tensor | None:
        return class_weight_schedule(cfg.class_weight, epoch, counts, cfg.drw_epoch, cfg.cb_beta)

    return ERM(Network(_spec(cfg, ctx)), loss, weights)


@METHOD_BUILDERS.register("cbd")
def _build_cbd(cfg: TrainConfig, ctx: BuildContext) -> Method:
    from pipeline.train.methods import CBD

    args = dict(cfg.method_args)
    names = args.pop("teachers", None)
    if not names:
        raise ConfigError("method cbd needs method_args.teachers: a list of teacher names")
    teachers = [load_network(model_dir(ctx, f"teachers/{n}")) for n in names]
    dim = sum(t.feature_dim for t in teachers)  # CBD-ENS: the student's h maps to the concatenated teacher width
    spec = _spec(cfg, ctx, neck_dim=dim)
    spec["normalize_features"] = True
    return CBD(Network(spec), teachers, **args)


@METHOD_BUILDERS.register("paco")
def _build_paco(cfg: TrainConfig, ctx: BuildContext) -> Method:
    from pipeline.train.methods import PaCo

    if len(cfg.transforms) != 2:
        raise ConfigError(f"method paco needs two transforms (query, key), got {cfg.transforms}")
    if not cfg.drop_last:
        raise ConfigError("method paco needs drop_last: true (the queue size must be a multiple of the batch size)")
    return PaCo(Network(_spec(cfg, ctx)), ctx.class_counts, batch_size=local_batch_size(cfg.batch_size),
                **cfg.method_args)


def _model_ref(ref: str) -> str:
    """``ce`` → ``teachers/ce``; ``teachers/x``, ``students/x``, ``rebalance/x`` stay as they are."""
    return ref if "/" in ref else f"teachers/{ref}"


def _check_even_batches(cfg: TrainConfig, ctx: BuildContext) -> None:
    """Mixup needs every batch even: with ``drop_last: false`` the epoch's last batch must be too."""
    labels = load_split(str(ctx.dataset_dir), "train").labels
    sampler = create_sampler(cfg.sampler, labels=labels, seed=cfg.seed, num_epochs=cfg.epochs, **cfg.sampler_args)
    last = len(sampler) % cfg.batch_size
    if last % 2:
        raise ConfigError(f"method deit_lt: an epoch of {len(sampler)} samples ends in a batch of {last} (odd), which "
                          f"Mixup cannot pair; set drop_last: true or an even epoch length")


@METHOD_BUILDERS.register("deit_lt")
def _build_deit_lt(cfg: TrainConfig, ctx: BuildContext) -> Method:
    from timm.data import Mixup

    from pipeline.data.transforms import BatchAdapter
    from pipeline.train.methods import DeiTLT

    args = dict(cfg.method_args)
    ref = args.pop("teacher", None)
    if not ref:
        raise ConfigError("method deit_lt needs method_args.teacher: a pipeline model (e.g. teachers/paco_sam)")
    if not cfg.model.distilled:
        raise ConfigError("method deit_lt needs model.distilled: true and a distilled ViT backbone (deit_lt_*)")
    if cfg.batch_size % 2:
        raise ConfigError(f"method deit_lt: batch_size must be even (Mixup pairs each image with the flipped "
                          f"batch), got {cfg.batch_size}")
    mixup_args = args.pop("mixup", None)
    if mixup_args and not cfg.drop_last:
        _check_even_batches(cfg, ctx)
    teacher = load_network(model_dir(ctx, _model_ref(ref)))
    student_in = resolve_input(cfg.input, ctx.dataset)
    teacher_in = teacher.spec.get("input") or resolve_input(None, ctx.dataset)
    adapter = BatchAdapter(teacher_in["size"], student_in["mean"], student_in["std"], teacher_in["mean"],
                           teacher_in["std"], renormalize=args.pop("teacher_renormalize", True))
    mixup = Mixup(**{"mode": "batch", **mixup_args}, num_classes=ctx.num_classes) if mixup_args else None
    drw = cfg.drw_epoch if cfg.class_weight == "drw" else None
    if cfg.class_weight not in ("none", "drw"):
        raise ConfigError(f"method deit_lt: class_weight {cfg.class_weight!r}; valid: none, drw (on the DIST head)")
    return DeiTLT(Network(_spec(cfg, ctx)), teacher, adapter, ctx.class_counts, mixup=mixup, drw_epoch=drw,
                  cb_beta=cfg.cb_beta, **args)


class _QueryEncoder(torch.nn.Module):
    """RAC's frozen encoder E on the student's batches: re-prepare them for E, then embed (B, D)."""

    def __init__(self, adapter: torch.nn.Module, embed: torch.nn.Module, use_forward_features: bool) -> None:
        super().__init__()
        self.adapter, self.embed, self.use_forward_features = adapter, embed, use_forward_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapter(x)
        return self.embed.forward_features(x) if self.use_forward_features else self.embed.encode(x)


def rac_memory(index_name: str, ctx: BuildContext, edits: dict | None = None) -> tuple[Any, dict, dict]:
    """The retrieval memory of ``data/index/<index_name>`` with ``edits`` applied, its encoder config and the
    features of every split under that encoder (``pipeline.index.encoders.split_features``)."""
    import json

    from pipeline.index.encoders import split_features
    from pipeline.index.memory import RetrievalMemory
    from pipeline.index.neighbours import edit_memory

    index_dir = ctx.data_root / "index" / index_name
    if not (index_dir / "stats.json").is_file():
        raise ConfigError(f"index {index_name!r} not found at {index_dir}: no index stage produces it "
                          "(check method_args.index)")
    enc = json.loads((index_dir / "stats.json").read_text())["encoder"]
    memory = RetrievalMemory.load(index_dir)
    splits = split_features(ctx.dataset_dir, enc["type"], enc["model"], checkpoint_file=enc.get("checkpoint_file"),
                            teacher_dir=ctx.data_root / "teachers" / enc["model"] if enc["type"] == "teacher" else None)
    edits = dict(edits or {})
    unknown = set(edits) - {"add_splits", "remove_classes", "remove_ids"}
    if unknown:
        raise ConfigError(f"memory edits: unknown key(s) {sorted(unknown)}; valid: add_splits, remove_classes, "
                          "remove_ids")
    add = [s for s in edits.get("add_splits") or []]
    for s in add:
        if s not in splits or s == "train":
            raise ConfigError(f"memory edits: add_splits names {s!r}; valid: "
                              f"{', '.join(k for k in splits if k != 'train') or 'none (no val/test split)'}")
    if add or edits.get("remove_classes") or edits.get("remove_ids"):
        memory = edit_memory(
            memory,
            add_vectors=np.concatenate([splits[s]["features"] for s in add]) if add else None,
            add_ids=np.concatenate([splits[s]["ids"] for s in add]) if add else None,
            add_labels=np.concatenate([splits[s]["labels"] for s in add]) if add else None,
            remove_classes=edits.get("remove_classes") or (), remove_ids=edits.get("remove_ids") or ())
    return memory, enc, splits


def _rac_encoder(enc: dict, ctx: BuildContext, student_in: dict) -> torch.nn.Module:
    from pipeline.data.transforms import BatchAdapter
    from pipeline.index.encoders import create_encoder

    if enc["type"] == "teacher":
        net = load_network(model_dir(ctx, f"teachers/{enc['model']}"))
        target = net.spec.get("input") or resolve_input(None, ctx.dataset)
        adapter = BatchAdapter(target["size"], student_in["mean"], student_in["std"], target["mean"], target["std"])
        return _QueryEncoder(adapter, net, use_forward_features=True)
    kw = {"checkpoint_file": enc.get("checkpoint_file")} if enc["type"] == "timm" else {
        "pretrained": enc.get("checkpoint_file")}
    encoder = create_encoder(enc["type"], model=enc["model"], **kw)
    size = encoder.input_size[0] if encoder.input_size else None
    adapter = BatchAdapter(size, student_in["mean"], student_in["std"], encoder.mean.flatten().tolist(),
                           encoder.std.flatten().tolist())
    return _QueryEncoder(adapter, encoder, use_forward_features=False)


@METHOD_BUILDERS.register("rac")
def _build_rac(cfg: TrainConfig, ctx: BuildContext) -> Method:
    from pipeline.index.neighbours import Retriever
    from pipeline.index.text import create_text_encoder
    from pipeline.models.retrieval import RetrievalBranch
    from pipeline.train.methods.rac import RAC, precompute_texts

    args = dict(cfg.method_args)
    index_name = args.pop("index", None)
    if not index_name:
        raise ConfigError("method rac needs method_args.index: the index stage whose memory it reads (e.g. ce)")
    k = int(args.pop("k", 30))
    memory, enc, splits = rac_memory(index_name, ctx, args.pop("memory", None))
    if not 1 <= k <= len(memory) - 1:
        raise ConfigError(f"method rac: k={k} is larger than the memory allows ({len(memory)} entries, one of them "
                          "the query itself); lower method_args.k")
    retriever = Retriever(memory, k)
    text = dict(args.pop("text_encoder", None) or {"name": "bow"})
    branch = RetrievalBranch(create_text_encoder(text.pop("name"), **text), ctx.num_classes)
    neighbours = args.pop("neighbours", "precomputed")
    if neighbours not in ("precomputed", "per_batch"):
        raise ConfigError(f"method rac: neighbours {neighbours!r}; valid: precomputed, per_batch")
    if args:
        raise ConfigError(f"method rac: unknown method_args {sorted(args)}; valid: index, k, memory, text_encoder, "
                          "neighbours")
    train = splits["train"]
    texts = precompute_texts(retriever, train["features"], train["ids"]) if neighbours == "precomputed" else None
    student_in = resolve_input(cfg.input, ctx.dataset)
    loss = create_loss(cfg.loss, class_counts=ctx.class_counts, **cfg.loss_args)
    return RAC(Network(_spec(cfg, ctx)), branch, _rac_encoder(enc, ctx, student_in), retriever, loss,
               train_texts=texts, train_ids=train["ids"])


def create_method(cfg: TrainConfig, ctx: BuildContext) -> Method:
    return METHOD_BUILDERS.create(cfg.method, cfg=cfg, ctx=ctx)


# --- optimisation -----------------------------------------------------------------------------------------------
def create_optimizer(cfg: TrainConfig, method: Method) -> torch.optim.Optimizer:
    """SGD (or AdamW) over ``method.param_groups()``, wrapped in SAM when the updater is 'sam'."""
    o = cfg.optimizer
    lr = base_lr(cfg)
    if o.name == "sgd":
        base, kwargs = torch.optim.SGD, dict(lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                             nesterov=o.nesterov)
    else:
        base, kwargs = torch.optim.AdamW, dict(lr=lr, weight_decay=o.weight_decay)
    groups = method.param_groups()
    if cfg.updater.name == "sam":
        return SAM(groups, base, rho=cfg.updater.rho, **kwargs)
    return base(groups, **kwargs)


def create_updater(cfg: TrainConfig):
    u = cfg.updater
    if u.name == "sam":
        rho = create_rho_schedule(u.rho_schedule, rho=u.rho, epochs=cfg.epochs, **u.rho_args)
        return UPDATERS.create("sam", rho_schedule=rho, freeze_bn_second_pass=u.freeze_bn_second_pass)
    return UPDATERS.create(u.name)


def base_lr(cfg: TrainConfig) -> float:
    """The peak lr: ``optimizer.lr``, scaled by ``batch_size / optimizer.lr_base_batch`` when that is set."""
    o = cfg.optimizer
    return o.lr * cfg.batch_size / o.lr_base_batch if o.lr_base_batch else o.lr


def create_lr(cfg: TrainConfig) -> Callable[[int], float]:
    return create_lr_schedule(cfg.lr_schedule, base_lr=base_lr(cfg), epochs=cfg.epochs, **cfg.lr_args)


def resolve_device(name: str) -> torch.device:
    """The training device; under torchrun on CUDA this rank's ``cuda:LOCAL_RANK``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


# --- data -------------------------------------------------------------------------------------------------------
def _transform(name: str, input_spec: dict, **kwargs: Any):
    return create_transform(name, image_size=input_spec["size"], mean=input_spec["mean"], std=input_spec["std"],
                            **kwargs)


def create_train_loader(cfg: TrainConfig, ctx: BuildContext, device: torch.device,
                        input_spec: dict | None = None) -> DataLoader:
    """The training loader: one view per ``cfg.transforms`` entry, the configured sampler, seeded per epoch.

    Under torchrun: this rank's shard of the sampler's epoch and ``batch_size / world_size`` per update.

    ``input_spec`` (a network's ``spec["input"]``) overrides ``cfg.input``: a rebalanced head sees its source
    network's preprocessing.
    """
    split = load_split(str(ctx.dataset_dir), "train")
    spec = input_spec or resolve_input(cfg.input, ctx.dataset)
    transforms = [_transform(t, spec, **{"hflip": ctx.dataset.hflip, **cfg.transform_args.get(t, {})})
                  for t in cfg.transforms]
    sampler = create_sampler(cfg.sampler, labels=split.labels, seed=cfg.seed, num_epochs=cfg.epochs,
                             **cfg.sampler_args)
    # This rank's shard; augmentations a pure function of (seed, epoch, position): resumable, and the same on W ranks.
    sampler.configure(rank=distributed.rank(), world_size=distributed.world_size(), sample_seeds=True)
    return DataLoader(ImageDataset(split, transforms), batch_size=local_batch_size(cfg.batch_size), sampler=sampler,
                      num_workers=cfg.num_workers, collate_fn=collate, drop_last=cfg.drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)


def create_eval_loader(ctx: BuildContext, split_name: str, batch_size: int = 256, num_workers: int = 0,
                       device: torch.device | None = None, input_spec: dict | None = None) -> DataLoader | None:
    """A loader over ``split_name`` with the test transform, in order; None for an empty split.

    ``input_spec``: the network's preprocessing (``spec["input"]``); default the dataset's.
    """
    split = load_split(str(ctx.dataset_dir), split_name)
    if len(split) == 0:
        return None
    spec = input_spec or resolve_input(None, ctx.dataset)
    return DataLoader(ImageDataset(split, [_transform("test", spec)]), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate,
                      pin_memory=device is not None and device.type == "cuda")
