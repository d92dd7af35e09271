"""Every method preset (conf/method/*.yaml, CPU-sized) and official recipe (conf/paper/*.yaml) builds and trains.

Each YAML is loaded, shrunk (2 epochs, batch 8, PaCo queue 16, no workers, CPU, fp32), validated with the
``TrainConfig`` schema, built with ``create_method`` against a tiny synthetic long-tailed dataset and trained for
two updates by the real ``Trainer`` over the real loader, sampler, transforms, optimizer, updater and lr schedule.
CBD and DeiT-LT presets get their teachers from one tiny ``erm_ce`` teacher trained by ``train_and_export`` and copied
under each teacher name, so a 4-teacher ensemble still has 4 × 64 concatenated feature dimensions. RAC presets read a
tiny memory over that teacher's features (an exact cosine index), stored under the index name the preset asks for;
pretrained weights (RAC's ImageNet-21k ViT, a CLIP text tower) are not available offline, so those presets train from
their random initialisation here.
"""

from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.build import (
    METHOD_BUILDERS,
    BuildContext,
    create_lr,
    create_method,
    create_optimizer,
    create_train_loader,
    create_updater,
    to_schema,
)
from pipeline.compose import compose
from pipeline.config import DatasetConfig, TrainConfig
from pipeline.data import build_longtail, load_source, load_split, save_dataset
from pipeline.train.run import train_and_export
from pipeline.train.trainer import Trainer, TrainerConfig, seed_everything

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(CONF.glob("method/*.yaml")) + sorted(CONF.glob("paper/*.yaml"))
STEPS = 2  # optimizer updates per preset
BATCH = 8


def _preset_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def load_preset(path: Path) -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert "defaults" not in raw, f"{path}: presets are self-contained (no Hydra defaults list)"
    return raw


def tiny(raw: dict) -> TrainConfig:
    """The preset validated by the schema, then shrunk: 2 epochs, batch 8, PaCo K 16, DRW from epoch 0, CPU."""
    cfg = to_schema(TrainConfig, raw, "preset")
    small = dict(epochs=2, batch_size=BATCH, num_workers=0, device="cpu", amp="off")
    if cfg.class_weight == "drw":
        small["drw_epoch"] = 0  # exercise the class-balanced weights within the two updates
    if cfg.method == "paco":
        small["method_args"] = {**cfg.method_args, "queue_size": 2 * BATCH}
    if cfg.method == "rac":  # the tiny memory holds 18 entries
        text = {k: v for k, v in cfg.method_args.get("text_encoder", {}).items() if k != "pretrained"}
        small["method_args"] = {**cfg.method_args, "k": 5, "text_encoder": text}
    if cfg.model.pretrained:  # no pretrained weights offline
        small["model"] = replace(cfg.model, pretrained=False)
    return replace(cfg, **small)


class _FirstSteps:
    """The first ``n`` batches of a loader; keeps ``sampler`` so the Trainer still calls ``set_epoch``."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.sampler, self.n = loader, loader.sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> BuildContext:
    root = tmp_path_factory.mktemp("presets")
    source = load_source("synthetic", num_classes=4, images_per_class=20, image_size=16)
    ds = build_longtail(source, val_per_class=2, test_per_class=4, n_max=10, imbalance_factor=5)
    save_dataset(ds, str(root / "dataset"))
    ctx = BuildContext(root / "dataset", root / "data", DatasetConfig(image_size=16))
    # One tiny erm_ce teacher, copied under every name a CBD preset asks for (see _with_teachers).
    teacher = tiny(load_preset(CONF / "method" / "erm_ce.yaml"))
    teacher = replace(teacher, epochs=1, model=replace(teacher.model, backbone="cifar_resnet8"))
    assert train_and_export(teacher, ctx, root / "teacher", root / "ckpt" / "teacher") is not None
    return ctx


def _tiny_index(ctx: BuildContext, name: str) -> None:
    """A RAC memory over the tiny teacher's train features, as the index stage writes it (memory + stats.json)."""
    from pipeline.index.encoders import split_features
    from pipeline.index.memory import RetrievalMemory
    from pipeline.io import write_json

    dest = ctx.data_root / "index" / name
    if dest.exists():
        return
    _copy_teacher(ctx, "ce")
    train = split_features(ctx.dataset_dir, "teacher", "ce", teacher_dir=ctx.data_root / "teachers" / "ce")["train"]
    memory = RetrievalMemory.build(train["features"], train["ids"], train["labels"], [f"class {c}" for c in range(4)],
                                   kind="exact", metric="cosine")
    memory.save(dest)
    write_json(dest / "stats.json", {"encoder": {"type": "teacher", "model": "ce", "checkpoint_file": None}})


def _copy_teacher(ctx: BuildContext, name: str) -> None:
    dest = ctx.data_root / "teachers" / name
    if not dest.exists():
        shutil.copytree(ctx.data_root.parent / "teacher", dest)


def _with_teachers(cfg: TrainConfig, ctx: BuildContext) -> None:
    for name in cfg.method_args.get("teachers", []):
        _copy_teacher(ctx, name)
    if "teacher" in cfg.method_args:  # DeiT-LT: teachers/<name>
        _copy_teacher(ctx, cfg.method_args["teacher"].removeprefix("teachers/"))
    if cfg.method == "rac":
        _tiny_index(ctx, cfg.method_args["index"])


def train_steps(cfg: TrainConfig, ctx: BuildContext) -> tuple[Trainer, list[torch.Tensor], list[torch.Tensor]]:
    """Build the method from ``cfg`` and run ``STEPS`` updates of epoch 0; return (trainer, params before, after)."""
    _with_teachers(cfg, ctx)
    seed_everything(cfg.seed)
    method = create_method(cfg, ctx)
    params = [p for g in method.param_groups() for p in g["params"]]
    before = [p.detach().clone() for p in params]
    device = torch.device("cpu")
    loader = _FirstSteps(create_train_loader(cfg, ctx, device), STEPS)
    trainer = Trainer(method, create_updater(cfg), create_optimizer(cfg, method), loader,
                      TrainerConfig(epochs=cfg.epochs, lr_schedule=create_lr(cfg), seed=cfg.seed, amp=cfg.amp,
                                    stop_after_epochs=1),
                      device=device)
    trainer.fit()
    return trainer, before, [p.detach().clone() for p in params]


@pytest.mark.parametrize("path", PRESETS, ids=_preset_id)
def test_preset_trains(path: Path, ctx: BuildContext) -> None:
    cfg = tiny(load_preset(path))
    trainer, before, after = train_steps(cfg, ctx)
    assert trainer.step == STEPS
    loss = trainer.history[0]["train/loss"]
    assert math.isfinite(loss) and loss > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert sum(changed) > len(changed) // 2, f"{path.name}: only {sum(changed)} of {len(changed)} tensors moved"
    if cfg.method == "cbd":  # CBD-ENS: the student's h maps to the concatenated teacher features (64 each)
        assert trainer.method.network.feature_dim == 64 * len(cfg.method_args["teachers"])


def test_sam_changes_the_update(ctx: BuildContext) -> None:
    """Same preset, seed and batches: SAM's perturbed gradient gives other weights than the plain step."""
    sam = tiny(load_preset(CONF / "method" / "ldam_drw_sam.yaml"))
    assert sam.updater.name == "sam"
    plain = replace(sam, updater=replace(sam.updater, name="standard"))
    _, _, w_sam = train_steps(sam, ctx)
    _, _, w_sam_again = train_steps(sam, ctx)
    _, _, w_plain = train_steps(plain, ctx)
    assert all(torch.equal(a, b) for a, b in zip(w_sam, w_sam_again, strict=True)), "identical runs must agree"
    assert any(not torch.allclose(a, b) for a, b in zip(w_sam, w_plain, strict=True))


def test_every_method_has_a_preset() -> None:
    methods = {load_preset(p)["method"] for p in PRESETS}
    assert set(METHOD_BUILDERS.names()) <= methods, set(METHOD_BUILDERS.names()) - methods


@pytest.mark.parametrize("group", ["paper_cifar10", "paper_cifar100"])
def test_paper_teachers_compose(group: str) -> None:
    """The paper teacher groups compose and validate; the paper CBD student's teachers are among them."""
    teachers = compose(CONF, [f"teachers={group}"])["teachers"]
    for name, raw in teachers.items():
        to_schema(TrainConfig, raw, f"teachers.{name}")
    assert "ce" in teachers  # the quick rebalance, index and student groups read teachers/ce
    assert teachers["cbd_std_s1"]["seed"] != teachers["cbd_std_s2"]["seed"]
    student = load_preset(CONF / "paper" / "cbd_student.yaml")
    assert set(student["method_args"]["teachers"]) <= set(teachers)
    # the memory edits read students.rac, which the paper group lacks: memory=none, as the README says
    students = compose(CONF, [f"teachers={group}", "students=paper", "memory=none"])["students"]
    assert students["deit_lt"]["method"] == "deit_lt"
    teacher = students["deit_lt"]["method_args"]["teacher"].removeprefix("teachers/")
    assert teachers[teacher]["method"] == "paco" and teachers[teacher]["updater"]["name"] == "sam"


def test_memory_edit_scores_rac_without_retraining(ctx: BuildContext) -> None:
    """memory@: the trained RAC student against a memory without one class: other predictions, the same weights."""
    import numpy as np

    from pipeline.config import MemoryConfig
    from pipeline.evaluate.predict import load_predictions
    from pipeline.memory import score_memory
    from pipeline.models.network import load_network
    from pipeline.train.checkpoint import state_digest

    cfg = tiny(load_preset(CONF / "method" / "rac.yaml"))
    _with_teachers(cfg, ctx)
    student = ctx.data_root / "students" / "rac"
    assert train_and_export(cfg, ctx, student, ctx.data_root.parent / "ckpt" / "rac") is not None
    same = score_memory(MemoryConfig(model="rac"), cfg, ctx, ctx.data_root / "memory" / "same")
    gone = score_memory(MemoryConfig(model="rac", remove_classes=[0]), cfg, ctx, ctx.data_root / "memory" / "gone")
    trained = load_predictions(student)
    unchanged = load_predictions(ctx.data_root / "memory" / "same")
    edited = load_predictions(ctx.data_root / "memory" / "gone")
    for head in ("fused", "base", "retrieval"):  # the unedited memory reproduces the student's own predictions
        np.testing.assert_allclose(unchanged[f"test/{head}"], trained[f"test/{head}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(edited["test/base"], trained["test/base"])  # the base branch never reads memory
    assert not np.allclose(edited["test/retrieval"], trained["test/retrieval"])
    head_class = int(np.argmax(ctx.class_counts))
    assert head_class == 0 and gone["memory_size"] == same["memory_size"] - ctx.class_counts[0]
    assert gone["weights"] == same["weights"]
    assert gone["weights"]["network"] == state_digest(load_network(student))


def test_rac_bad_memory_settings_fail_with_one_line(ctx: BuildContext) -> None:
    """k larger than the memory, a missing index and a missing encoder model each name the setting."""
    from pipeline.config import ConfigError

    cfg = tiny(load_preset(CONF / "method" / "rac.yaml"))
    _with_teachers(cfg, ctx)
    size = len(load_split(str(ctx.dataset_dir), "train"))
    with pytest.raises(ConfigError, match=rf"k=500 is larger than the memory allows \({size} entries"):
        create_method(replace(cfg, method_args={**cfg.method_args, "k": 500}), ctx)
    with pytest.raises(ConfigError, match="index 'nope' not found"):
        create_method(replace(cfg, method_args={**cfg.method_args, "index": "nope"}), ctx)
    orphan = ctx.data_root / "index" / "orphan"
    shutil.copytree(ctx.data_root / "index" / cfg.method_args["index"], orphan)
    (orphan / "stats.json").write_text('{"encoder": {"type": "teacher", "model": "gone", "checkpoint_file": null}}')
    with pytest.raises((ConfigError, FileNotFoundError), match="gone"):
        create_method(replace(cfg, method_args={**cfg.method_args, "index": "orphan"}), ctx)
    with pytest.raises(ConfigError, match="unknown method_args"):
        create_method(replace(cfg, method_args={**cfg.method_args, "kk": 3}), ctx)
