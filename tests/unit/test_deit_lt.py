"""DeiT-LT (METHODS.md §6): loss, teacher feeding, DRW/Mixup switch, repeated augmentation, heads, optimisation, resume.

The loss is recomputed by hand (soft-target CE, plain CE, the DIST CE to the teacher's argmax weighted by the
*teacher-predicted* class); the frozen teacher must see exactly ``BatchAdapter(mixed batch)`` in eval mode and never
change; ``on_epoch_start`` switches Mixup off and the DRW weights on; the repeated-augmentation sampler, the
parameter groups, the lr scaling and the timm cosine schedule follow the official definitions; an interrupted and
resumed run is bit-identical; the builder rejects a bad configuration with one ConfigError naming the key.
Tiny models throughout: a depth-1 ``deit_lt_nano_patch4_32`` student at 16 px and a ``cifar_resnet8`` teacher at 8 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.build import BuildContext, base_lr, create_lr, create_method, create_optimizer, to_schema
from pipeline.config import ConfigError, ModelConfig, OptimizerConfig, TrainConfig
from pipeline.data.samplers import RepeatedAugSampler, create_sampler
from pipeline.data.transforms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, BatchAdapter
from pipeline.losses import deit_lt_loss, deit_lt_loss_parts, drw_weights, soft_target_cross_entropy
from pipeline.models.network import Network, save_network
from pipeline.optim.schedules import timm_cosine_lr
from pipeline.train.methods import DeiTLT
from pipeline.train.run import fit_method
from pipeline.train.trainer import Trainer, TrainerConfig, seed_everything
from pipeline.train.updaters import StandardUpdate

C, B = 4, 8
COUNTS = [12, 7, 4, 3]  # the tiny dataset's train counts (tests/conftest.py)
STUDENT_SIZE, TEACHER_SIZE = 16, 8
MIXUP_ARGS = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)


# --- helpers ----------------------------------------------------------------------------------------------------
def _student_spec() -> dict:
    return {
        "backbone": {"name": "deit_lt_nano_patch4_32", "depth": 1, "img_size": STUDENT_SIZE},
        "neck": None,
        "head": {"name": "linear"},
        "dist_head": {"name": "linear"},
        "normalize_features": False,
        "num_classes": C,
    }


def _teacher_spec() -> dict:
    return {
        "backbone": {"name": "cifar_resnet8"},
        "neck": None,
        "head": {"name": "linear"},
        "normalize_features": False,
        "num_classes": C,
        "input": {"size": TEACHER_SIZE, "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)},
    }


def _adapter(renormalize: bool = True) -> BatchAdapter:
    return BatchAdapter(TEACHER_SIZE, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD, renormalize=renormalize)


def _mixup() -> Mixup:
    return Mixup(**MIXUP_ARGS, mode="batch", num_classes=C)


def _method(drw_epoch: int | None = 1, no_mixup_drw: bool = True, mixup: bool = True) -> tuple[DeiTLT, Network]:
    torch.manual_seed(0)
    student, teacher = Network(_student_spec()), Network(_teacher_spec())  # teacher in train mode: DeiTLT freezes it
    with torch.no_grad():  # non-trivial BN statistics, so that a change of them would show
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    method = DeiTLT(
        student,
        teacher,
        _adapter(),
        COUNTS,
        mixup=_mixup() if mixup else None,
        drw_epoch=drw_epoch,
        no_mixup_drw=no_mixup_drw,
    )
    return method, teacher


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": [torch.randn(B, 3, STUDENT_SIZE, STUDENT_SIZE, generator=g)],
        "labels": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]),
        "index": torch.arange(B),
    }


def _smoothed_one_hot(y: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    off = smoothing / C
    return torch.full((len(y), C), off).scatter_(1, y[:, None], 1.0 - smoothing + off)


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"state tensor {k!r} differs"


# --- 1. the loss by hand ----------------------------------------------------------------------------------------
def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, C, generator=g, dtype=torch.float64), torch.randn(5, C, generator=g, dtype=torch.float64)


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    return z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))


LABELS = torch.tensor([0, 1, 2, 3, 0])
# the teacher's argmax is [2, 2, 0, 1, 3]: it disagrees with LABELS on every sample
TEACHER = torch.tensor(
    [[0.1, 0.2, 3.0, 0.0], [0.0, 1.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.3, 0.1, 0.2], [0.0, 0.0, 0.0, 9.0]],
    dtype=torch.float64,
)
TEACHER_CLASS = torch.tensor([2, 2, 0, 1, 3])


def test_soft_target_cls_term_by_hand() -> None:
    cls, dist = _logits(0)
    t = torch.softmax(torch.randn(5, C, generator=torch.Generator().manual_seed(9), dtype=torch.float64), dim=1)
    expected = -(t * _log_softmax(cls)).sum(dim=1).mean()
    torch.testing.assert_close(soft_target_cross_entropy(cls, t), expected)
    parts = deit_lt_loss_parts(cls, dist, t, TEACHER)
    torch.testing.assert_close(parts["cls"], expected)
    # a one-hot soft target is plain CE on the hard label
    torch.testing.assert_close(
        deit_lt_loss_parts(cls, dist, F.one_hot(LABELS, C).double(), TEACHER)["cls"],
        deit_lt_loss_parts(cls, dist, LABELS, TEACHER)["cls"],
    )


def test_hard_label_cls_term_and_unweighted_dist_term_by_hand() -> None:
    assert torch.equal(TEACHER.argmax(1), TEACHER_CLASS)
    cls, dist = _logits(1)
    parts = deit_lt_loss_parts(cls, dist, LABELS, TEACHER)
    ls_cls, ls_dist = _log_softmax(cls), _log_softmax(dist)
    torch.testing.assert_close(parts["cls"], -ls_cls[torch.arange(5), LABELS].mean())
    # DIST: CE to the argmax of the teacher's logits, not to the true label
    torch.testing.assert_close(parts["dist"], -ls_dist[torch.arange(5), TEACHER_CLASS].mean())
    assert not torch.isclose(parts["dist"], -ls_dist[torch.arange(5), LABELS].mean())


def test_weighted_dist_term_is_indexed_by_the_teacher_class() -> None:
    cls, dist = _logits(2)
    w = torch.tensor([0.4, 0.7, 1.3, 1.6], dtype=torch.float64)
    ce = -_log_softmax(dist)[torch.arange(5), TEACHER_CLASS]  # (5,) per-sample CE to the teacher's class
    expected = (w[TEACHER_CLASS] * ce).sum() / w[TEACHER_CLASS].sum()  # PyTorch's weighted mean
    parts = deit_lt_loss_parts(cls, dist, LABELS, TEACHER, dist_class_weight=w)
    torch.testing.assert_close(parts["dist"], expected)
    # the same weights looked up by the true labels would give another value: the test tells them apart
    wrong = (w[LABELS] * ce).sum() / w[LABELS].sum()
    assert not torch.isclose(expected, wrong)
    # the CLS term is never weighted
    torch.testing.assert_close(parts["cls"], deit_lt_loss_parts(cls, dist, LABELS, TEACHER)["cls"])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_alpha_mixes_the_two_terms(alpha: float) -> None:
    cls, dist = _logits(3)
    w = torch.tensor([0.4, 0.7, 1.3, 1.6], dtype=torch.float64)
    parts = deit_lt_loss_parts(cls, dist, LABELS, TEACHER, dist_class_weight=w, alpha=alpha)
    torch.testing.assert_close(parts["loss"], (1 - alpha) * parts["cls"] + alpha * parts["dist"])
    torch.testing.assert_close(deit_lt_loss(cls, dist, LABELS, TEACHER, w, alpha), parts["loss"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_raises(alpha: float) -> None:
    cls, dist = _logits(4)
    with pytest.raises(ValueError, match="alpha"):
        deit_lt_loss(cls, dist, LABELS, TEACHER, alpha=alpha)


def test_no_gradient_flows_into_the_teacher_logits() -> None:
    cls, dist = (t.requires_grad_() for t in _logits(5))
    teacher = TEACHER.clone().requires_grad_()
    deit_lt_loss(cls, dist, LABELS, teacher).backward()
    assert teacher.grad is None and cls.grad is not None and dist.grad is not None


# --- 2. the teacher sees the resized mixed batch, in eval mode, and never changes --------------------------------
class _Recorder:
    """A forward pre-hook that keeps the teacher's inputs and its training flag at each call."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.training: list[bool] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.inputs.append(args[0].detach().clone())
        self.training.append(module.training)


def test_teacher_receives_the_adapted_mixed_batch_in_eval_mode() -> None:
    method, teacher = _method()
    rec = _Recorder()
    teacher.register_forward_pre_hook(rec)
    method.train()
    assert method.network.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    batch = _batch()
    original = batch["images"][0].clone()
    np.random.seed(0)
    out = method.prepare_batch(batch)
    mixed = out["images"][0]
    assert torch.equal(batch["images"][0], original)  # Mixup worked on a copy
    assert not torch.equal(mixed, original)  # ... and did mix
    assert len(rec.inputs) == 1 and rec.training == [False]
    seen = rec.inputs[0]
    assert seen.shape == (B, 3, TEACHER_SIZE, TEACHER_SIZE)
    # exactly the adapter applied to the mixed student batch: bicubic resize 16 → 8, ImageNet → CIFAR statistics
    resized = F.interpolate(mixed, size=(TEACHER_SIZE, TEACHER_SIZE), mode="bicubic", align_corners=False)
    m_s, s_s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    m_t, s_t = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen, (resized * s_s + m_s - m_t) / s_t)
    assert torch.equal(seen, _adapter()(mixed))
    teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(out["teacher_logits"], teacher(seen))
    assert out["teacher_logits"].shape == (B, C) and out["targets"].shape == (B, C)


def test_teacher_stays_frozen_through_trainer_steps() -> None:
    method, teacher = _method(drw_epoch=1)
    teacher_before, student_before = _clone_state(teacher), _clone_state(method.network)
    rec = _Recorder()
    teacher.register_forward_pre_hook(rec)
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-3, weight_decay=0.05)
    loader = [_batch(1), _batch(2)]
    cfg = TrainerConfig(epochs=2, lr_schedule=lambda e: 1e-3, amp="off")
    Trainer(method, StandardUpdate(), opt, loader, cfg, device="cpu").fit()
    assert len(rec.training) == 4 and not any(rec.training)  # 2 epochs × 2 batches, always in eval mode
    # parameters and every BN buffer (running_mean, running_var, num_batches_tracked) are unchanged
    assert any(k.endswith("num_batches_tracked") for k in teacher_before)
    _assert_same_state(teacher_before, _clone_state(teacher))
    assert all(p.grad is None for p in teacher.parameters())
    changed = [k for k, v in _clone_state(method.network).items() if not torch.equal(v, student_before[k])]
    assert changed  # the student did train


# --- 3. BatchAdapter --------------------------------------------------------------------------------------------
def _stats(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def test_batch_adapter_renormalises_exactly() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # [0, 1] images
    m_s, s_s = _stats(IMAGENET_MEAN, IMAGENET_STD)
    m_t, s_t = _stats(CIFAR_MEAN, CIFAR_STD)
    x_s = (x - m_s) / s_s
    out = BatchAdapter(None, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD)(x_s)
    torch.testing.assert_close(out, (x - m_t) / s_t, rtol=0, atol=1e-5)
    # same size: no resize happens, and identical statistics are the identity
    same = BatchAdapter(8, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD)(x_s)
    torch.testing.assert_close(same, (x - m_t) / s_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(BatchAdapter(None, CIFAR_MEAN, CIFAR_STD, CIFAR_MEAN, CIFAR_STD)(x_s), x_s)


def test_batch_adapter_without_renormalisation_keeps_values() -> None:
    x_s = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    adapter = BatchAdapter(None, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD, renormalize=False)
    assert torch.equal(adapter(x_s), x_s)
    resized = BatchAdapter(5, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD, renormalize=False)(x_s)
    assert torch.equal(resized, F.interpolate(x_s, size=(5, 5), mode="bicubic", align_corners=False))


@pytest.mark.parametrize("size", [5, 16])
def test_batch_adapter_resize_is_bicubic_without_antialias(size: int) -> None:
    x_s = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    out = BatchAdapter(size, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD, renormalize=False)(x_s)
    assert out.shape == (2, 3, size, size)
    assert torch.equal(out, F.interpolate(x_s, size=(size, size), mode="bicubic", align_corners=False))
    # the official torchvision 0.15 tensor Resize(size, interpolation=3): bicubic, no antialias, no clamping
    official = TF.resize(x_s, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=False)
    torch.testing.assert_close(out, official, rtol=0, atol=1e-5)
    if size < 12:  # downsampling: antialias would give something else
        aa = F.interpolate(x_s, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        assert not torch.allclose(out, aa, atol=1e-3)
    bilinear = BatchAdapter(
        size, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD, renormalize=False, interpolation="bilinear"
    )(x_s)
    assert not torch.allclose(out, bilinear, atol=1e-3)


def test_batch_adapter_rejects_unknown_interpolation() -> None:
    with pytest.raises(ValueError, match="bicubic, bilinear"):
        BatchAdapter(8, IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD, interpolation="nearest")


# --- 4. DRW and the Mixup switch --------------------------------------------------------------------------------
def _check_mixed(x: torch.Tensor, y: torch.Tensor, mixed: torch.Tensor, targets: torch.Tensor) -> str:
    """Check one timm batch-mode Mixup/CutMix draw against §6.3; return which of the two it was."""
    assert targets.shape == (B, C)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    off = 0.1 / C
    assert float(targets.min()) == pytest.approx(off)  # label smoothing: classes of neither image keep 0.1/C
    assert float(targets.max()) <= 1 - 0.1 + off + 1e-6
    y1 = _smoothed_one_hot(y)
    lam = float((targets[0, y[-1]] - off) / (1 - 0.1))  # the share of the flipped image in row 0
    lam = 1.0 - lam
    torch.testing.assert_close(targets, lam * y1 + (1 - lam) * y1.flip(0))
    if torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), rtol=0, atol=1e-5):
        return "mixup"
    from_flip = (mixed == x.flip(0)).all(dim=1)  # (B, H, W) pixels pasted from the flipped batch
    assert torch.equal(from_flip | (mixed == x).all(dim=1), torch.ones_like(from_flip))
    assert float(from_flip[0].float().mean()) == pytest.approx(1 - lam, abs=1e-6)  # correct_lam: λ = 1 − box area
    return "cutmix"


def test_before_drw_mixup_is_on_and_dist_is_unweighted() -> None:
    method, _ = _method(drw_epoch=2)
    method.train()
    method.on_epoch_start(0)
    assert method.mixup_active and method.dist_weight is None
    kinds = set()
    for seed in range(8):
        np.random.seed(seed)
        batch = _batch(seed)
        out = method.prepare_batch(batch)
        kinds.add(_check_mixed(batch["images"][0], batch["labels"], out["images"][0], out["targets"]))
    assert kinds == {"mixup", "cutmix"}
    step = method.training_step(out)
    cls_tok, dist_tok = method.network.forward_tokens(out["images"][0])
    cls, dist = method.network.head(cls_tok), method.network.dist_head(dist_tok)
    torch.testing.assert_close(step.loss, deit_lt_loss(cls, dist, out["targets"], out["teacher_logits"]))
    torch.testing.assert_close(step.logits, (cls + dist) / 2)


@pytest.mark.parametrize("epoch", [2, 3])
def test_from_drw_epoch_mixup_stops_and_dist_is_class_balanced(epoch: int) -> None:
    method, _ = _method(drw_epoch=2, no_mixup_drw=True)
    method.train()
    method.on_epoch_start(epoch)
    assert not method.mixup_active
    expected_w = drw_weights(COUNTS, 0.9999)
    torch.testing.assert_close(method.dist_weight, expected_w.float())
    assert float(method.dist_weight.sum()) == pytest.approx(C)
    batch = _batch()
    out = method.prepare_batch(batch)
    assert torch.equal(out["targets"], batch["labels"]) and out["targets"].shape == (B,)
    assert torch.equal(out["images"][0], batch["images"][0])
    step = method.training_step(out)
    cls_tok, dist_tok = method.network.forward_tokens(out["images"][0])
    cls, dist = method.network.head(cls_tok), method.network.dist_head(dist_tok)
    torch.testing.assert_close(
        step.loss, deit_lt_loss(cls, dist, batch["labels"], out["teacher_logits"], dist_class_weight=expected_w.float())
    )
    # back before DRW (a pure function of the epoch)
    method.on_epoch_start(1)
    assert method.mixup_active and method.dist_weight is None


def test_without_no_mixup_drw_mixup_continues_but_weights_switch() -> None:
    method, _ = _method(drw_epoch=2, no_mixup_drw=False)
    method.on_epoch_start(2)
    assert method.mixup_active
    torch.testing.assert_close(method.dist_weight, drw_weights(COUNTS, 0.9999).float())
    np.random.seed(0)
    batch = _batch()
    out = method.prepare_batch(batch)
    _check_mixed(batch["images"][0], batch["labels"], out["images"][0], out["targets"])


def test_no_drw_and_no_mixup() -> None:
    method, _ = _method(drw_epoch=None, mixup=False)
    for epoch in (0, 5, 2000):
        method.on_epoch_start(epoch)
        assert not method.mixup_active and method.dist_weight is None
    batch = _batch()
    assert torch.equal(method.prepare_batch(batch)["targets"], batch["labels"])


# --- 5. RepeatedAugSampler --------------------------------------------------------------------------------------
def test_repeated_aug_cycle_repeats_each_index_three_times_in_a_row() -> None:
    labels = np.arange(10) % 3
    s = RepeatedAugSampler(labels, seed=0, epoch_length="cycle")
    idx = np.array(list(s))
    assert len(idx) == len(s) == 30
    triples = idx.reshape(10, 3)
    assert (triples == triples[:, :1]).all()  # repeat_interleave: the copies are consecutive
    assert sorted(triples[:, 0].tolist()) == list(range(10))  # a permutation of the N indices
    assert not np.array_equal(triples[:, 0], np.arange(10))  # shuffled
    assert np.array_equal(s.cycle(), idx)
    assert isinstance(create_sampler("repeated_aug", labels=labels, seed=0, num_epochs=1), RepeatedAugSampler)


@pytest.mark.parametrize(("n", "length"), [(600, 512), (256, 256), (511, 256), (100, 100), (5, 5)])
def test_repeated_aug_official_epoch_length(n: int, length: int) -> None:
    s = RepeatedAugSampler(np.zeros(n, dtype=np.int64), seed=1)
    idx = np.array(list(s))
    assert len(idx) == len(s) == length
    assert np.array_equal(idx, s.cycle()[:length])  # the head of the cycle
    assert np.bincount(idx).max() <= 3


def test_repeated_aug_order_is_a_function_of_seed_and_epoch() -> None:
    labels = np.zeros(600, dtype=np.int64)
    a, b = RepeatedAugSampler(labels, seed=4), RepeatedAugSampler(labels, seed=4)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) == list(a)
    b.set_epoch(4)
    assert list(a) != list(b)
    c = RepeatedAugSampler(labels, seed=5)
    c.set_epoch(3)
    assert list(a) != list(c)


def test_repeated_aug_integer_length_and_repeats() -> None:
    labels = np.zeros(10, dtype=np.int64)
    assert len(RepeatedAugSampler(labels, epoch_length=7)) == 7
    assert len(RepeatedAugSampler(labels, epoch_length=100)) == 30  # at most one cycle
    two = np.array(list(RepeatedAugSampler(labels, num_repeats=2, epoch_length="cycle")))
    assert len(two) == 20 and (two.reshape(10, 2)[:, 0] == two.reshape(10, 2)[:, 1]).all()


@pytest.mark.parametrize("bad", ["foo", 0, -3, True, 2.5, None])
def test_repeated_aug_bad_epoch_length_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="epoch_length"):
        RepeatedAugSampler(np.zeros(10, dtype=np.int64), epoch_length=bad)


def test_repeated_aug_bad_num_repeats_raises() -> None:
    with pytest.raises(ValueError, match="num_repeats"):
        RepeatedAugSampler(np.zeros(10, dtype=np.int64), num_repeats=0)


# --- 6. heads and features --------------------------------------------------------------------------------------
def test_avg_head_is_the_mean_of_cls_and_dist_logits() -> None:
    method, _ = _method()
    method.eval()
    net = method.network
    x = _batch()["images"][0]
    with torch.no_grad():
        tokens = net.backbone.forward_features(x)  # (B, 2 + N, F): [CLS, DIST, patches] after the final norm
        assert tokens.shape == (B, 2 + (STUDENT_SIZE // 4) ** 2, net.feature_dim)
        cls, dist = net.head(tokens[:, 0]), net.dist_head(tokens[:, 1])
        heads = method.predict(x)
        assert list(heads) == ["avg", "cls", "dist"] and method.head_names == ("avg", "cls", "dist")
        torch.testing.assert_close(heads["cls"], cls)
        torch.testing.assert_close(heads["dist"], dist)
        torch.testing.assert_close(heads["avg"], (cls + dist) / 2)
        torch.testing.assert_close(net(x), (cls + dist) / 2)
        assert not torch.allclose(cls, dist)  # two different heads
        # forward_features is the CLS token embedding (what rebalancing and retrieval use)
        torch.testing.assert_close(net.forward_features(x), tokens[:, 0])
        torch.testing.assert_close(method.embed(x), tokens[:, 0])
    assert method.export() is net and net.distilled


def test_student_must_be_distilled() -> None:
    spec = _student_spec()
    spec["dist_head"] = None
    with pytest.raises(ValueError, match="distilled"):
        DeiTLT(Network(spec), Network(_teacher_spec()), _adapter(), COUNTS)


def test_dist_head_needs_a_distilled_backbone() -> None:
    spec = {**_teacher_spec(), "dist_head": {"name": "linear"}}
    with pytest.raises(ValueError, match="dist_head needs a distilled ViT"):
        Network(spec)


# --- 7. parameter groups ----------------------------------------------------------------------------------------
def test_param_groups_skip_weight_decay_on_1d_and_token_parameters() -> None:
    method, teacher = _method()
    groups = method.param_groups()
    assert len(groups) == 2
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    tokens = {"backbone.pos_embed", "backbone.cls_token", "backbone.dist_token"}
    names = dict(method.network.named_parameters())
    assert tokens <= set(names)
    for name, p in names.items():
        if p.ndim <= 1 or name in tokens:
            assert id(p) in no_decay and id(p) not in decay, name
        else:
            assert id(p) in decay and id(p) not in no_decay, name
    # every trainable student parameter exactly once; no teacher parameter
    flat = [id(p) for g in groups for p in g["params"]]
    assert len(flat) == len(set(flat)) == len(names)
    assert set(flat) == {id(p) for p in method.network.parameters()}
    assert not set(flat) & {id(p) for p in teacher.parameters()}


def test_create_optimizer_adamw_weight_decay_per_group() -> None:
    method, _ = _method()
    cfg = TrainConfig(
        method="deit_lt",
        batch_size=128,
        optimizer=OptimizerConfig(name="adamw", lr=5e-4, lr_base_batch=512, weight_decay=0.05),
    )
    opt = create_optimizer(cfg, method)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == pytest.approx(1.25e-4) for g in opt.param_groups)
    assert len(opt.param_groups[1]["params"]) == sum(
        1 for n, p in method.network.named_parameters() if p.ndim <= 1 or n.endswith(("pos_embed", "_token"))
    )


# --- 8. learning rate -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lr", "batch", "base", "expected"), [(5e-4, 128, 512, 1.25e-4), (5e-4, 256, 512, 2.5e-4), (1e-3, 64, None, 1e-3)]
)
def test_base_lr_linear_scaling(lr: float, batch: int, base: int | None, expected: float) -> None:
    cfg = TrainConfig(batch_size=batch, optimizer=OptimizerConfig(name="adamw", lr=lr, lr_base_batch=base))
    assert base_lr(cfg) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("epochs", "warmup"), [(20, 5), (12, 3)])
def test_timm_cosine_lr_matches_timm_scheduler(epochs: int, warmup: int) -> None:
    from timm.scheduler import CosineLRScheduler

    base = 1.25e-4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=1e-5, warmup_t=warmup, warmup_lr_init=1e-6)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=128,
        lr_schedule="timm_cosine",
        lr_args={"warmup": warmup, "warmup_lr": 1e-6, "min_lr": 1e-5},
        optimizer=OptimizerConfig(name="adamw", lr=5e-4, lr_base_batch=512),
    )
    schedule = create_lr(cfg)
    for epoch in range(epochs + 3):
        sched.step(epoch)
        timm_lr = opt.param_groups[0]["lr"]
        assert timm_cosine_lr(epoch, base, epochs, warmup=warmup, warmup_lr=1e-6, min_lr=1e-5) == pytest.approx(
            timm_lr, rel=1e-12, abs=1e-15
        ), epoch
        assert schedule(epoch) == pytest.approx(timm_lr, rel=1e-12, abs=1e-15), epoch
    assert timm_cosine_lr(0, base, epochs, warmup=warmup) == pytest.approx(1e-6)


# --- builder fixtures -------------------------------------------------------------------------------------------
@pytest.fixture
def saved_teacher(build_ctx: BuildContext) -> Path:
    """A tiny cifar_resnet8 teacher at 8 px with CIFAR statistics, saved as ``teachers/tiny``."""
    torch.manual_seed(1)
    out = build_ctx.data_root / "teachers" / "tiny"
    save_network(Network(_teacher_spec()), out)
    return out


def _deit_cfg(**overrides: object) -> TrainConfig:
    """A tiny DeiT-LT student config, parsed and validated like a params.yaml entry."""
    raw: dict = {
        "method": "deit_lt",
        "method_args": {
            "teacher": "tiny",
            "alpha": 0.5,
            "no_mixup_drw": True,
            "teacher_renormalize": True,
            "mixup": dict(MIXUP_ARGS),
        },
        "model": {
            "backbone": "deit_lt_nano_patch4_32",
            "backbone_args": {"depth": 1, "img_size": STUDENT_SIZE},
            "head": "linear",
            "distilled": True,
        },
        "input": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "class_weight": "drw",
        "drw_epoch": 1,
        "epochs": 2,
        "batch_size": 8,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "lr_schedule": "timm_cosine",
        "lr_args": {"warmup": 1, "warmup_lr": 1e-6, "min_lr": 1e-5},
        "sampler": "repeated_aug",
        "sampler_args": {"num_repeats": 3, "epoch_length": "official"},
        "transforms": ["deit"],
        "amp": "off",
        "device": "cpu",
        "num_workers": 0,
        "seed": 7,
    }
    raw.update(overrides)
    return to_schema(TrainConfig, raw, "students.deit_lt")


# --- 9. resume bit-identity -------------------------------------------------------------------------------------
def _fit(cfg: TrainConfig, ctx: BuildContext, ckpt_dir: Path, stop: int | None = None):
    seed_everything(cfg.seed)
    method = create_method(cfg, ctx)
    trainer, _ = fit_method(method, cfg, ctx, ckpt_dir, None, stop_after_epochs=stop)
    return method, trainer


@pytest.mark.parametrize(("epochs", "drw_epoch"), [(2, 1), (3, 2)])  # (3, 2): Mixup draws after the resume too
def test_interrupted_and_resumed_run_is_bit_identical(
    build_ctx: BuildContext, saved_teacher: Path, tmp_path: Path, epochs: int, drw_epoch: int
) -> None:
    """Stopped after epoch 0 and resumed by a fresh Method/Trainer == uninterrupted; the DRW switch comes after."""
    cfg = _deit_cfg(epochs=epochs, drw_epoch=drw_epoch)
    m_full, t_full = _fit(cfg, build_ctx, tmp_path / "full")
    assert isinstance(m_full, DeiTLT) and t_full.finished
    assert isinstance(t_full.loader.sampler, RepeatedAugSampler) and t_full.loader.num_workers == 0
    assert not m_full.mixup_active and m_full.dist_weight is not None  # the last epoch ran with DRW, without Mixup
    m_cut, t_cut = _fit(cfg, build_ctx, tmp_path / "cut", stop=1)
    assert not t_cut.finished and len(t_cut.history) == 1
    assert m_cut.mixup_active and m_cut.dist_weight is None  # stopped before the DRW switch
    m_res, t_res = _fit(cfg, build_ctx, tmp_path / "cut")
    assert t_res.start_epoch == 1 and t_res.finished and len(t_res.history) == epochs
    assert not m_res.mixup_active
    torch.testing.assert_close(m_res.dist_weight, drw_weights(build_ctx.class_counts, cfg.cb_beta).float())
    _assert_same_state(m_full.state_dict(), m_res.state_dict())
    s_full, s_res = t_full.optimizer.state_dict(), t_res.optimizer.state_dict()
    assert s_full["param_groups"] == s_res["param_groups"]
    for i in s_full["state"]:
        for k, v in s_full["state"][i].items():
            assert torch.equal(v, s_res["state"][i][k]), (i, k)
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in t_full.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in t_res.history
    ]
    # the teacher loaded from disk is the saved one, untouched by training
    teacher = torch.load(saved_teacher / "model.pt", weights_only=True)
    _assert_same_state(teacher, m_res.teacher.state_dict())


# --- 10. builder errors -----------------------------------------------------------------------------------------
def test_builder_wires_teacher_adapter_and_mixup(build_ctx: BuildContext, saved_teacher: Path) -> None:
    method = create_method(_deit_cfg(), build_ctx)
    assert isinstance(method, DeiTLT) and method.network.distilled
    assert not method.teacher.training and all(not p.requires_grad for p in method.teacher.parameters())
    a = method.teacher_adapter
    assert a.size == TEACHER_SIZE and a.renormalize and a.interpolation == "bicubic"
    torch.testing.assert_close(a.src_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(a.dst_std.flatten(), torch.tensor(CIFAR_STD))
    assert isinstance(method.mixup, Mixup) and method.mixup.label_smoothing == 0.1
    assert method.mixup.mode == "batch" and method.mixup.num_classes == C
    assert method.drw_epoch == 1 and method.alpha == 0.5
    assert not create_method(_deit_cfg(class_weight="none"), build_ctx).drw_epoch


def _config_error(cfg: TrainConfig, ctx: BuildContext) -> str:
    with pytest.raises(ConfigError) as info:
        create_method(cfg, ctx)
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg  # one line
    return msg


def test_missing_teacher_is_one_config_error_naming_it(build_ctx: BuildContext) -> None:
    args = {**_deit_cfg().method_args, "teacher": "no_such_teacher"}
    msg = _config_error(_deit_cfg(method_args=args), build_ctx)
    assert "teachers/no_such_teacher" in msg
    args.pop("teacher")
    assert "method_args.teacher" in _config_error(_deit_cfg(method_args=args), build_ctx)


def test_odd_batch_size_is_a_config_error(build_ctx: BuildContext, saved_teacher: Path) -> None:
    msg = _config_error(_deit_cfg(batch_size=7), build_ctx)
    assert "batch_size" in msg and "7" in msg


def test_undistilled_student_is_a_config_error(build_ctx: BuildContext, saved_teacher: Path) -> None:
    model = {
        "backbone": "deit_lt_nano_patch4_32",
        "backbone_args": {"depth": 1, "img_size": STUDENT_SIZE},
        "head": "linear",
        "distilled": False,
    }
    assert "model.distilled" in _config_error(_deit_cfg(model=model), build_ctx)


def test_class_weight_other_than_drw_is_a_config_error(build_ctx: BuildContext, saved_teacher: Path) -> None:
    assert "class_weight" in _config_error(_deit_cfg(class_weight="reweight"), build_ctx)


def test_model_config_distilled_adds_a_dist_head() -> None:
    from pipeline.build import network_spec

    model = ModelConfig(backbone="deit_lt_nano_patch4_32", backbone_args={"depth": 1}, distilled=True)
    spec = network_spec(model, C)
    assert spec["dist_head"] == spec["head"]


# --- bugs found -------------------------------------------------------------------------------------------------
def test_odd_last_batch_is_refused(build_ctx: BuildContext, saved_teacher: Path, tmp_path: Path) -> None:
    """With drop_last false an epoch of 27 samples ends in a batch of 3, which Mixup cannot pair: a build error."""
    cfg = _deit_cfg(epochs=1, sampler_args={"num_repeats": 3, "epoch_length": 27})
    with pytest.raises(ConfigError, match="drop_last"):
        _fit(cfg, build_ctx, tmp_path / "ckpt")


def test_retrained_teacher_is_not_resumed_from_a_stale_checkpoint(
    build_ctx: BuildContext, saved_teacher: Path, tmp_path: Path
) -> None:
    """A student's checkpoint belongs to its teacher: a retrained teacher starts the run over (state_digest)."""
    cfg = _deit_cfg(epochs=1)
    _fit(cfg, build_ctx, tmp_path / "ckpt")
    torch.manual_seed(123)  # the teacher stage reran: other weights at the same path
    save_network(Network(_teacher_spec()), saved_teacher)
    new_teacher = torch.load(saved_teacher / "model.pt", weights_only=True)
    method, trainer = _fit(cfg, build_ctx, tmp_path / "ckpt")
    assert trainer.start_epoch == 0, "the checkpoint of the run with the old teacher was resumed"
    _assert_same_state(new_teacher, method.teacher.state_dict())
