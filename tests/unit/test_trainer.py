"""The one training engine (DESIGN.md "One training engine"): resume bit-identity, checkpoints, NaN guard, selection.

A run interrupted at an epoch boundary and resumed must end bit-identical (on the CPU) to an uninterrupted one, with
the standard and the SAM updater; a checkpoint of another config is ignored; a NaN loss component stops the run
naming it; ``select='best_val'`` leaves the best epoch's weights; the lr of each epoch comes from the schedule.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.build import create_method
from pipeline.config import UpdaterConfig
from pipeline.optim import SAM
from pipeline.train.checkpoint import config_hash, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.train.method import Method, StepOutput
from pipeline.train.run import fit_method, train_and_export
from pipeline.train.trainer import NonFiniteLossError, Trainer, TrainerConfig, seed_everything
from pipeline.train.updaters import SAMUpdate, StandardUpdate


# --- helpers ----------------------------------------------------------------------------------------------------
def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"state tensor {k!r} differs"


def _optimizer_buffers(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = opt.state_dict()["state"]
    return [state[i]["momentum_buffer"] for i in sorted(state)]


class _Toy(Method):
    """A linear classifier over (B, 3) inputs; ``nan_part`` names a loss part that is NaN."""

    def __init__(self, nan_part: str | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.nan_part = nan_part

    def training_step(self, batch: dict) -> StepOutput:
        logits = self.fc(batch["images"][0])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        parts = {"ce": loss.detach()}
        if self.nan_part == "loss":
            loss = loss * float("nan")
        elif self.nan_part is not None:
            parts[self.nan_part] = torch.tensor(float("nan"))
        return StepOutput(loss=loss, parts=parts, logits=logits)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.fc(images)}


def _toy_loader(n_batches: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"images": [torch.randn(4, 3, generator=g)], "labels": torch.tensor([0, 1, 1, 0]), "index": torch.arange(4)}
        for _ in range(n_batches)
    ]


def _toy_trainer(method: Method, epochs: int = 2, **cfg: object) -> Trainer:
    opt = torch.optim.SGD(method.param_groups(), lr=0.1, momentum=0.9)
    val_fn = cfg.pop("val_fn", None)
    cfg.setdefault("amp", "off")
    config = TrainerConfig(epochs=epochs, lr_schedule=lambda e: 0.1, **cfg)
    return Trainer(method, StandardUpdate(), opt, _toy_loader(), config, device="cpu", val_fn=val_fn)


# --- resume bit-identity ----------------------------------------------------------------------------------------
def test_erm_resumed_run_is_bit_identical(make_train_config, build_ctx, tmp_path: Path) -> None:
    """train_and_export stopped after 1 epoch, again after 1, then resumed == one uninterrupted run."""
    cfg = make_train_config(epochs=3, class_weight="drw", drw_epoch=1)
    full = train_and_export(cfg, build_ctx, tmp_path / "full", tmp_path / "ckpt_full")
    assert full is not None and full["epochs"] == 3
    assert train_and_export(cfg, build_ctx, tmp_path / "cut", tmp_path / "ckpt_cut", stop_after_epochs=1) is None
    assert not (tmp_path / "cut").exists()  # nothing is exported before the run is finished
    assert train_and_export(cfg, build_ctx, tmp_path / "cut", tmp_path / "ckpt_cut", stop_after_epochs=1) is None
    assert load_checkpoint(tmp_path / "ckpt_cut" / "checkpoint.pt", _any_hash(tmp_path / "ckpt_cut"))["epoch"] == 2
    resumed = train_and_export(cfg, build_ctx, tmp_path / "cut", tmp_path / "ckpt_cut")
    assert resumed is not None and resumed["epochs"] == 3
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    _assert_same_state(a, b)
    assert full["test"] == resumed["test"]
    # a rerun of a finished run (dvc repro after the outputs were removed) trains nothing and exports the same model
    again = train_and_export(cfg, build_ctx, tmp_path / "again", tmp_path / "ckpt_cut")
    assert again is not None and again["epochs"] == 3
    _assert_same_state(a, torch.load(tmp_path / "again" / "model.pt", weights_only=True))


def _any_hash(ckpt_dir: Path) -> str:
    return torch.load(ckpt_dir / "checkpoint.pt", weights_only=True)["config_hash"]


def _fit(cfg, ctx, ckpt_dir: Path, stop: int | None = None):
    seed_everything(cfg.seed)
    method = create_method(cfg, ctx)
    trainer, _ = fit_method(method, cfg, ctx, ckpt_dir, None, stop_after_epochs=stop)
    return method, trainer


def test_sam_resumed_run_is_bit_identical(make_train_config, build_ctx, tmp_path: Path) -> None:
    """The SAM updater (rho changing per epoch, DRW switch) resumes bit for bit, optimizer momentum included."""
    updater = UpdaterConfig(
        name="sam", rho=0.1, rho_schedule="step", rho_args={"values": [0.05, 0.1, 0.2, 0.3], "boundaries": [1, 2, 3]}
    )
    cfg = make_train_config(epochs=3, updater=updater, class_weight="drw", drw_epoch=2)
    m_full, t_full = _fit(cfg, build_ctx, tmp_path / "a")
    assert isinstance(t_full.optimizer, SAM) and isinstance(t_full.updater, SAMUpdate)
    assert [g["rho"] for g in t_full.optimizer.param_groups] == [0.2]  # epoch 2 (e = 3 > 2 → c)
    m_cut, t_cut = _fit(cfg, build_ctx, tmp_path / "b", stop=2)
    assert not t_cut.finished and len(t_cut.history) == 2
    m_res, t_res = _fit(cfg, build_ctx, tmp_path / "b")
    assert t_res.start_epoch == 2 and t_res.finished
    _assert_same_state(m_full.state_dict(), m_res.state_dict())
    for x, y in zip(_optimizer_buffers(t_full.optimizer), _optimizer_buffers(t_res.optimizer), strict=True):
        assert torch.equal(x, y)
    drop = ("epoch_time_s",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in t_full.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in t_res.history
    ]


# --- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_config_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    t1 = _toy_trainer(_Toy(), epochs=2, checkpoint_path=ckpt, config_hash="aaaa")
    t1.fit()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    # same hash: resumes after the last epoch, runs nothing
    t_same = _toy_trainer(_Toy(), epochs=2, checkpoint_path=ckpt, config_hash="aaaa")
    t_same.fit()
    assert t_same.start_epoch == 2 and len(t_same.history) == 2
    _assert_same_state(t_same.method.state_dict(), t1.method.state_dict())
    # another hash: starts over and says so
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        t2 = _toy_trainer(_Toy(), epochs=2, checkpoint_path=ckpt, config_hash="bbbb")
        t2.fit()
    assert t2.start_epoch == 0 and [h["epoch"] for h in t2.history] == [0, 1]
    assert any("different config" in r.getMessage() and "starting over" in r.getMessage() for r in caplog.records)
    assert torch.load(ckpt, weights_only=True)["config_hash"] == "bbbb"


def test_config_hash_is_key_order_independent() -> None:
    assert config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == config_hash({"b": {"d": 3, "c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_checkpoint_round_trip_restores_rng_state(tmp_path: Path) -> None:
    seed_everything(123)
    torch.rand(3), np.random.rand(2), random.random()  # advance every generator
    path = tmp_path / "sub" / "checkpoint.pt"
    weights = {"w": torch.randn(4, 2)}
    save_checkpoint(
        path,
        {
            "epoch": 5,
            "method": weights,
            "rng": rng_state(),
            "config_hash": "h",
            "history": [{"epoch": 0, "lr": 0.1}],
            "best": None,
        },
    )
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    seed_everything(999)  # scramble
    state = load_checkpoint(path, "h")  # weights_only=True inside: only tensors and containers are stored
    assert state is not None and state["epoch"] == 5 and state["history"] == [{"epoch": 0, "lr": 0.1}]
    assert torch.equal(state["method"]["w"], weights["w"])
    set_rng_state(state["rng"])
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # the temporary file was renamed away
    assert load_checkpoint(path, "other") is None
    assert load_checkpoint(tmp_path / "missing.pt", "h") is None


def test_truncated_checkpoint_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"w": torch.randn(100), "config_hash": "h"})
    path.write_bytes(path.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert load_checkpoint(path, "h") is None
    assert "unreadable" in caplog.text


# --- NaN guard --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["distill", "loss"])
def test_nan_loss_component_raises_naming_it(part: str) -> None:
    torch.manual_seed(0)
    method = _Toy(nan_part=part)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    trainer = _toy_trainer(method)
    with pytest.raises(NonFiniteLossError, match=f"loss component '{part}' is nan at epoch 0, step 0"):
        trainer.fit()
    _assert_same_state(before, method.state_dict())  # raised before any optimizer step


def test_nan_guard_also_covers_sam_passes() -> None:
    torch.manual_seed(0)
    method = _Toy(nan_part="distill")
    opt = SAM(method.param_groups(), torch.optim.SGD, rho=0.05, lr=0.1)
    trainer = Trainer(
        method,
        SAMUpdate(lambda e: 0.05),
        opt,
        _toy_loader(),
        TrainerConfig(epochs=1, lr_schedule=lambda e: 0.1, amp="off"),
    )
    with pytest.raises(NonFiniteLossError, match="'distill'"):
        trainer.fit()


# --- model selection and schedules -------------------------------------------------------------------------------
def test_select_best_val_loads_the_best_epoch() -> None:
    torch.manual_seed(0)
    accs, snapshots = [0.1, 0.8, 0.3, 0.5], []

    def val_fn(m: Method) -> dict[str, float]:
        assert not m.training  # validation runs in eval mode
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"acc": accs[len(snapshots) - 1]}

    method = _Toy()
    trainer = _toy_trainer(method, epochs=4, select="best_val", val_fn=val_fn)
    history = trainer.fit()
    assert [h["val/acc"] for h in history] == accs
    assert trainer.best["epoch"] == 1
    _assert_same_state(method.state_dict(), snapshots[1])
    assert not any(torch.equal(method.fc.weight, s["fc.weight"]) for s in (snapshots[0], snapshots[3]))


def test_select_best_val_survives_a_resume(tmp_path: Path) -> None:
    """The best state is part of the checkpoint: best at epoch 1, interrupted after 2, resumed to 4."""
    accs, snapshots = [0.1, 0.8, 0.3, 0.5], []

    def val_fn(m: Method) -> dict[str, float]:
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"acc": accs[len(snapshots) - 1]}

    ckpt = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    t1 = _toy_trainer(
        _Toy(), epochs=4, select="best_val", val_fn=val_fn, checkpoint_path=ckpt, config_hash="h", stop_after_epochs=2
    )
    t1.fit()
    assert not t1.finished
    torch.manual_seed(1)
    method = _Toy()
    t2 = _toy_trainer(method, epochs=4, select="best_val", val_fn=val_fn, checkpoint_path=ckpt, config_hash="h")
    t2.fit()
    assert t2.finished and t2.best["epoch"] == 1
    _assert_same_state(method.state_dict(), snapshots[1])


def test_select_validation_errors() -> None:
    with pytest.raises(ValueError, match="val"):
        _toy_trainer(_Toy(), select="best_val")
    with pytest.raises(ValueError, match="valid: last, best_val"):
        _toy_trainer(_Toy(), select="best_test")


class _Slope(Method):
    """loss = sum(w) with two params in two groups: the gradient is 1, so each SGD step moves w by -lr."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.a]}, {"params": [self.b], "lr_scale": 0.1}]

    def training_step(self, batch: dict) -> StepOutput:
        return StepOutput(loss=self.a.sum() + self.b.sum())


def test_lr_schedule_applied_per_epoch() -> None:
    method = _Slope()
    opt = torch.optim.SGD(method.param_groups(), lr=123.0)  # overwritten by the schedule every epoch
    schedule = [0.5, 0.25, 0.125]
    seen: list[list[float]] = []

    def val_fn(m: Method) -> dict[str, float]:
        seen.append([g["lr"] for g in opt.param_groups])
        return {"acc": 0.0}

    batches = [{"images": [torch.zeros(1, 1)], "labels": torch.zeros(1, dtype=torch.long)}] * 2  # 2 steps/epoch
    trainer = Trainer(
        method,
        StandardUpdate(),
        opt,
        batches,
        TrainerConfig(epochs=3, lr_schedule=lambda e: schedule[e], amp="off"),
        val_fn=val_fn,
    )
    history = trainer.fit()
    assert seen == [[lr, lr * 0.1] for lr in schedule]
    assert [h["lr"] for h in history] == schedule
    torch.testing.assert_close(method.a.detach(), torch.tensor([-2 * sum(schedule)], dtype=torch.float64))
    torch.testing.assert_close(method.b.detach(), torch.tensor([-0.2 * sum(schedule)], dtype=torch.float64))
    assert trainer.step == 6


# --- AMP ----------------------------------------------------------------------------------------------------------
def test_fp16_with_sam_is_refused() -> None:
    method = _Toy()
    opt = SAM(method.param_groups(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(ValueError, match=r"SAM.*float16.*bf16"):
        Trainer(
            method,
            SAMUpdate(lambda e: 0.05),
            opt,
            _toy_loader(),
            TrainerConfig(epochs=1, lr_schedule=lambda e: 0.1, amp="fp16"),
        )


def test_unknown_amp_lists_valid_modes() -> None:
    with pytest.raises(ValueError, match="valid: off, bf16, fp16, auto"):
        _toy_trainer(_Toy(), amp="fp8")


def test_auto_amp_is_off_on_cpu() -> None:
    assert _toy_trainer(_Toy(), amp="auto").amp_dtype is None


def test_checkpoint_that_no_longer_fits_the_model_starts_over(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Same config hash, but the optimizer's groups changed (e.g. fewer trainable parameters): start over, warn."""
    torch.manual_seed(0)
    path = tmp_path / "checkpoint.pt"
    first = _Toy()
    _toy_trainer(first, epochs=1, checkpoint_path=path, config_hash="h").fit()
    torch.manual_seed(1)
    method = _Toy()
    method.fc.bias.requires_grad_(False)  # one parameter fewer in the optimizer's only group
    before = {k: v.clone() for k, v in method.state_dict().items()}
    trainer = _toy_trainer(method, epochs=1, checkpoint_path=path, config_hash="h")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.trainer"):
        trainer._resume()
    assert "does not fit this model" in caplog.text
    assert trainer.start_epoch == 0
    _assert_same_state(before, method.state_dict())


def test_bf16_with_sam_trains() -> None:
    """bf16 autocast (CPU autocast here, the GPU default) works with SAM's two passes."""
    torch.manual_seed(0)
    method = _Toy()
    before = method.fc.weight.detach().clone()
    opt = SAM(method.param_groups(), torch.optim.SGD, rho=0.05, lr=0.1)
    trainer = Trainer(method, SAMUpdate(lambda e: 0.05), opt, _toy_loader(),
                      TrainerConfig(epochs=1, lr_schedule=lambda e: 0.1, amp="bf16"))
    assert trainer.amp_dtype is torch.bfloat16
    history = trainer.fit()
    assert np.isfinite(history[0]["train/loss"])
    assert not torch.equal(before, method.fc.weight.detach())
