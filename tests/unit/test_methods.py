"""Training Methods: CBD / CBD-ENS (METHODS.md §7.3), Decoupled cRT (§5.3), ERM with DRW (§2.3), ``_with_head``.

The CBD loss is recomputed by hand from the student's features and logits and the teachers' normalised features;
Decoupled must change only the head (and the frozen backbone's BN statistics when ``update_bn``); DRW weights are a
pure function of the epoch, set in ``on_epoch_start``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.build import create_method
from pipeline.config import ModelConfig, RebalanceConfig
from pipeline.models.heads import CosineHead, LinearHead, LWSHead, TauNormHead, class_weight
from pipeline.models.network import Network, save_network
from pipeline.rebalance import _trained_head, _with_head
from pipeline.train.methods import CBD, ERM, Decoupled
from pipeline.train.updaters import StandardUpdate

C, B = 4, 6


def _spec(head: str = "linear", neck: int | None = None, normalize: bool = False) -> dict:
    return {
        "backbone": {"name": "cifar_resnet8"},
        "neck": {"dim": neck} if neck else None,
        "head": {"name": head},
        "normalize_features": normalize,
        "num_classes": C,
    }


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": [torch.randn(B, 3, 16, 16, generator=g)],
        "labels": torch.tensor([0, 1, 2, 3, 0, 1]),
        "index": torch.arange(B),
    }


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _step(method, batch: dict, lr: float = 0.1) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(method.param_groups(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batch = method.prepare_batch(batch)
    StandardUpdate().update(method, lambda: method.training_step(batch), opt)
    return opt


# --- CBD --------------------------------------------------------------------------------------------------------
def _cbd(alpha: float = 0.4, beta: float = 100.0) -> tuple[CBD, Network]:
    torch.manual_seed(0)
    teacher = Network(_spec())  # in train mode: CBD must put it in eval mode itself
    student = Network(_spec("cosine", neck=teacher.feature_dim, normalize=True))
    return CBD(student, [teacher], alpha=alpha, beta=beta), teacher


def test_cbd_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    method, teacher = _cbd()
    method.train()
    assert method.network.training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in method.network.parameters())
    # the optimizer sees only the student
    ids = {id(p) for g in method.param_groups() for p in g["params"]}
    assert ids == {id(p) for p in method.network.parameters()}
    before = _clone_state(teacher)
    _step(method, _batch())
    for k, v in teacher.state_dict().items():  # weights and BN running statistics untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, _cbd()[0].network.state_dict()[k]) for k, v in method.network.state_dict().items())


def test_cbd_loss_by_hand() -> None:
    alpha, beta = 0.4, 100.0
    method, teacher = _cbd(alpha, beta)
    method.train()
    batch = method.prepare_batch(_batch())
    x, y = batch["images"][0], batch["labels"]
    with torch.no_grad():
        t = F.normalize(teacher.forward_features(x), dim=1)  # (B, 64) the teacher's normalised feature
    torch.testing.assert_close(batch["teacher_features"], t)
    out = method.training_step(batch)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert method.network.backbone.stem[0].weight.grad is not None

    f = method.network.forward_features(x)  # (B, 64): neck + ReLU + L2-normalise
    torch.testing.assert_close(f.norm(dim=1), torch.ones(B))
    logits = method.network.forward_head(f)
    ce = F.cross_entropy(logits, y)
    cos = (F.normalize(f, dim=1) * t).sum(dim=1)
    expected = (1 - alpha) * ce + alpha * beta * (1 - cos).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.parts["ce"], ce.detach())
    torch.testing.assert_close(out.parts["distill"], (1 - cos).mean().detach())
    torch.testing.assert_close(out.logits, logits)
    # the student's head is CBD's cosine classifier with σ = 20
    assert isinstance(method.network.head, CosineHead) and float(method.network.head.scale) == 20.0


def test_cbd_needs_a_teacher() -> None:
    with pytest.raises(ValueError, match="at least one teacher"):
        CBD(Network(_spec("cosine", neck=8, normalize=True)), [])


def test_cbd_ens_concatenates_teachers(make_train_config, build_ctx) -> None:
    """Built from config: two saved teachers (64-d and 24-d features) → student neck of 88, concatenated targets."""
    torch.manual_seed(0)
    t1, t2 = Network(_spec()), Network(_spec(neck=24))
    save_network(t1, build_ctx.data_root / "teachers" / "a")
    save_network(t2, build_ctx.data_root / "teachers" / "b")
    cfg = make_train_config(
        method="cbd",
        method_args={"teachers": ["a", "b"], "alpha": 0.4, "beta": 100.0},
        model=ModelConfig(backbone="cifar_resnet8", head="cosine"),
    )
    method = create_method(cfg, build_ctx)
    assert isinstance(method, CBD) and len(method.teachers) == 2
    assert method.network.feature_dim == 64 + 24 and method.network.neck[0].out_features == 88
    assert method.network.normalize_features
    method.train()
    assert not any(m.training for m in method.teachers.modules())
    x = _batch()["images"][0]
    batch = method.prepare_batch(_batch())
    t1.eval(), t2.eval()
    with torch.no_grad():
        expected = torch.cat(
            [F.normalize(t1.forward_features(x), dim=1), F.normalize(t2.forward_features(x), dim=1)], dim=1
        )
    assert batch["teacher_features"].shape == (B, 88)
    torch.testing.assert_close(batch["teacher_features"], expected)
    out = method.training_step(batch)
    assert torch.isfinite(out.loss) and out.logits.shape == (B, C)


# --- Decoupled (cRT) ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("update_bn", [True, False])
def test_decoupled_changes_only_the_head(update_bn: bool) -> None:
    torch.manual_seed(0)
    src = Network(_spec())
    net = _with_head(src, {"name": "linear"})
    method = Decoupled(net, update_bn=update_bn).train()
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert net.backbone.training is update_bn
    before = _clone_state(net)
    _step(method, _batch())
    after = net.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith("head."):
            assert changed, name
        elif "running_" in name or "num_batches_tracked" in name:
            assert changed is update_bn, name  # official: BN statistics of the frozen backbone keep updating
        else:
            assert not changed, name
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("head."))


def test_decoupled_lws_trains_only_the_scales() -> None:
    """LWS (§5.5): W and b of the joint classifier stay frozen inside Decoupled; only ``s`` is learnt."""
    torch.manual_seed(0)
    src = Network(_spec())
    net = _trained_head(RebalanceConfig(method="lws"), src)
    method = Decoupled(net).train()
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"head.scales"}
    before = _clone_state(net.head)
    _step(method, _batch())
    assert torch.equal(net.head.fc.weight, before["fc.weight"]) and torch.equal(net.head.fc.bias, before["fc.bias"])
    assert not torch.equal(net.head.scales, before["scales"])


def test_decoupled_loss_is_plain_ce_on_frozen_features() -> None:
    torch.manual_seed(0)
    method = Decoupled(Network(_spec()), update_bn=False).train()
    batch = _batch()
    out = method.training_step(batch)
    with torch.no_grad():
        expected = F.cross_entropy(method.network(batch["images"][0]), batch["labels"])
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.loss.requires_grad


# --- ERM with DRW ---------------------------------------------------------------------------------------------------
def _cb(counts: list[int], beta: float) -> torch.Tensor:
    n = np.asarray(counts, dtype=np.float64)
    w = (1 - beta) / (1 - beta**n)
    return torch.tensor(w / w.sum() * len(n), dtype=torch.float32)


def test_erm_drw_weights_switch_at_the_epoch(make_train_config, build_ctx) -> None:
    counts = build_ctx.class_counts
    assert counts == [12, 7, 4, 3]
    method = create_method(make_train_config(class_weight="drw", drw_epoch=2, cb_beta=0.9999), build_ctx)
    assert isinstance(method, ERM)
    for epoch in (0, 1):
        method.on_epoch_start(epoch)
        assert torch.equal(method.class_weight, torch.ones(C))
    for epoch in (2, 5):
        method.on_epoch_start(epoch)
        torch.testing.assert_close(method.class_weight, _cb(counts, 0.9999))
        assert method.class_weight.sum().item() == pytest.approx(C)
    # going back (a resumed run starting at epoch 1) gives the pre-switch weights again: a pure function of epoch
    method.on_epoch_start(1)
    assert torch.equal(method.class_weight, torch.ones(C))
    # the weights reach the loss: weighted mean CE
    method.on_epoch_start(2)
    method.train()
    batch = _batch()
    out = method.training_step(batch)
    logits = method.network(batch["images"][0])
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch["labels"], weight=_cb(counts, 0.9999)))


def test_erm_reweight_and_none(make_train_config, build_ctx) -> None:
    method = create_method(make_train_config(class_weight="reweight"), build_ctx)
    method.on_epoch_start(0)
    torch.testing.assert_close(method.class_weight, _cb(build_ctx.class_counts, 0.9999))
    method = create_method(make_train_config(class_weight="none"), build_ctx)
    method.on_epoch_start(0)
    assert method.class_weight is None


# --- rebalance helpers ----------------------------------------------------------------------------------------------
def test_with_head_keeps_backbone_and_neck_and_replaces_head() -> None:
    torch.manual_seed(0)
    src = Network(_spec(neck=16))
    src_state = _clone_state(src)
    net = _with_head(src, {"name": "cosine"})
    assert isinstance(net.head, CosineHead) and net.spec["head"] == {"name": "cosine"}
    assert src.spec["head"] == {"name": "linear"} and isinstance(src.head, LinearHead)  # source untouched
    for k, v in net.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, src_state[k]), k
    x = _batch()["images"][0]
    src.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), src.forward_features(x))
    assert net.backbone is not src.backbone  # a copy, not shared modules


def test_trained_heads_start_from_the_joint_classifier() -> None:
    torch.manual_seed(0)
    src = Network(_spec()).eval()
    x = _batch()["images"][0]
    lws = _trained_head(RebalanceConfig(method="lws"), src).eval()
    assert isinstance(lws.head, LWSHead)
    with torch.no_grad():
        assert torch.equal(lws(x), src(x))  # unit scales over the loaded joint classifier
    tau = _trained_head(RebalanceConfig(method="tau_norm", tau_select="learn"), src)
    assert isinstance(tau.head, TauNormHead) and tau.head.tau.requires_grad and float(tau.head.tau.detach()) == 1.0
    assert torch.equal(
        class_weight(tau.head), class_weight(src.head) / class_weight(src.head).norm(dim=1, keepdim=True)
    )
    crt = _trained_head(RebalanceConfig(method="crt"), src)
    assert isinstance(crt.head, LinearHead) and not torch.equal(crt.head.weight, src.head.weight)  # re-initialised
