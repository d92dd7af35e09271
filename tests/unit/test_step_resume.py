"""Step-level resume (``checkpoint_every``): a run cut between two checkpoints inside an epoch and resumed ends
bit-identical (on the CPU) to an uninterrupted run, and loses only the updates after the last checkpoint.

The cut is made in-process (``pipeline.train.trainer.kill_point`` replaced by one that raises at ``train:update:<n>``)
and, in the slow test, by a real SIGKILL of a subprocess (``LONGTAIL_TEST_KILL_AT``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.train.trainer as trainer_module
from pipeline.build import create_method, create_train_loader
from pipeline.config import UpdaterConfig
from pipeline.data import ImageDataset
from pipeline.data.samplers import create_sampler
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.run import fit_method
from pipeline.train.trainer import seed_everything

ROOT = Path(__file__).resolve().parents[2]


class _Cut(Exception):
    """Raised at the chosen kill point: the in-process stand-in for a preempted run."""


def _cut_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    real = trainer_module.kill_point

    def kill_point(name: str, *detail: object) -> None:
        real(name, *detail)
        if ":".join([name, *map(str, detail)]) == point:
            raise _Cut(point)

    monkeypatch.setattr(trainer_module, "kill_point", kill_point)


def _fit(cfg, ctx, ckpt_dir: Path):
    seed_everything(cfg.seed)
    method = create_method(cfg, ctx)
    trainer, _ = fit_method(method, cfg, ctx, ckpt_dir, None)
    return method, trainer


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"state tensor {k!r} differs"


def _history(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in trainer.history]


def _momentum(trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [state[i]["momentum_buffer"] for i in sorted(state)]


# batch 4 over the 26 training images: 7 batches (the last of 2) per epoch, 14 updates in 2 epochs. With
# checkpoint_every=2 the checkpoints inside epochs are after updates 2, 4, 6 (epoch 0) and 8, 10, 12 (epoch 1).
CASES = {
    "instance-epoch1": dict(sampler="instance", num_workers=0, cut=11, last=10),
    "instance-epoch0": dict(sampler="instance", num_workers=0, cut=5, last=4),
    "class_balanced-workers2": dict(sampler="class_balanced", num_workers=2, cut=9, last=8),
    "sam-class_balanced": dict(sampler="class_balanced", num_workers=0, cut=13, last=12, sam=True),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_cut_inside_an_epoch_resumes_bit_identical(make_train_config, build_ctx, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    c = CASES[case]
    extra = {}
    if c.get("sam"):
        extra["updater"] = UpdaterConfig(name="sam", rho=0.1)
    cfg = make_train_config(epochs=2, batch_size=4, sampler=c["sampler"], num_workers=c["num_workers"],
                            class_weight="drw", drw_epoch=1, **extra)
    m_full, t_full = _fit(cfg, build_ctx, tmp_path / "full")  # no checkpoints inside epochs
    assert t_full.step == 14

    cut_cfg = replace(cfg, checkpoint_every=2)
    _cut_at(monkeypatch, f"train:update:{c['cut']}")
    with pytest.raises(_Cut):
        _fit(cut_cfg, build_ctx, tmp_path / "cut")
    monkeypatch.undo()
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == c["last"] and state["batch"] == c["last"] % 7 and state["epoch"] == c["last"] // 7

    # checkpoint_every is not part of the config hash: resuming with another frequency continues the same run
    m_res, t_res = _fit(replace(cfg, checkpoint_every=3), build_ctx, tmp_path / "cut")
    assert t_res.start_step == c["last"] and c["cut"] - t_res.start_step <= 2 - 1  # at most N - 1 updates lost
    assert (t_res.start_epoch, t_res.start_batch) == (c["last"] // 7, c["last"] % 7)
    assert t_res.step == 14 and t_res.finished
    _same(m_full.state_dict(), m_res.state_dict())
    for x, y in zip(_momentum(t_full), _momentum(t_res), strict=True):
        assert torch.equal(x, y)
    assert _history(t_full) == _history(t_res)  # the resumed epoch's metrics include its batches before the cut


def test_skipped_batches_are_not_loaded(make_train_config, build_ctx, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The resumed epoch loads only its remaining samples: 26 - 3 batches of 4 = 14 in epoch 0, then 26."""
    cfg = make_train_config(epochs=2, batch_size=4, checkpoint_every=3)
    _cut_at(monkeypatch, "train:update:4")
    with pytest.raises(_Cut):
        _fit(cfg, build_ctx, tmp_path / "ckpt")
    monkeypatch.undo()
    loads = []
    real = ImageDataset.load
    monkeypatch.setattr(ImageDataset, "load", lambda self, i: loads.append(len(self)) or real(self, i))
    _, t = _fit(cfg, build_ctx, tmp_path / "ckpt")
    assert t.start_step == 3 and t.start_batch == 3
    assert loads.count(26) == (26 - 3 * 4) + 26  # training split (the 16 validation images are loaded per epoch)


def test_epoch_end_checkpoint_is_not_doubled(make_train_config, build_ctx, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An update that ends an epoch writes the epoch's checkpoint only (no inside-epoch one at batch == length)."""
    points = []
    real = trainer_module.save_checkpoint

    def save(path, state):
        points.append((state["epoch"], state["batch"], state["step"]))
        real(path, state)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    _fit(make_train_config(epochs=2, batch_size=4, checkpoint_every=7), build_ctx, tmp_path / "ckpt")
    assert points == [(1, 0, 7), (2, 0, 14)]  # 7 updates per epoch: every 7th is an epoch end
    points.clear()
    _fit(make_train_config(epochs=1, batch_size=4, checkpoint_every=3), build_ctx, tmp_path / "ckpt3")
    assert points == [(0, 3, 3), (0, 6, 6), (1, 0, 7)]


def test_sampler_skip_and_sample_seeds() -> None:
    labels = np.repeat(np.arange(3), [10, 5, 2])
    s = create_sampler("class_balanced", labels=labels, seed=1, num_epochs=2).configure(sample_seeds=True)
    s.set_epoch(1)
    full = list(s)
    assert all(isinstance(i, int) and isinstance(seed, int) for i, seed in full)
    s.skip(5)
    assert list(s) == full[5:] and len(s) == len(full) - 5
    s.set_epoch(1)  # a new epoch (or the same again) starts from its first sample
    assert list(s) == full
    s.set_epoch(0)
    assert [seed for _, seed in s] != [seed for _, seed in full]  # fresh seeds every epoch
    with pytest.raises(ValueError, match="sampler skip 18: valid 0..17"):
        s.skip(18)


def test_augmentation_depends_on_the_sample_seed_only(make_train_config, build_ctx) -> None:
    """The same (index, seed) gives the same views whatever the process drew before; the caller's RNG is kept."""
    ds = create_train_loader(make_train_config(transforms=["standard"]), build_ctx, torch.device("cpu")).dataset
    torch.manual_seed(0)
    a = ds[(3, 12345)]
    torch.rand(7)
    state = torch.get_rng_state()
    b = ds[(3, 12345)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0][0], b[0][0]) and a[1:] == b[1:] == (ds.split.labels[3], 3)
    c = [ds[(3, s)][0][0] for s in range(8)]
    assert any(not torch.equal(c[0], x) for x in c[1:])  # other seeds, other crops and flips


_VICTIM = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from pipeline.build import BuildContext, create_method
from pipeline.config import DatasetConfig, ModelConfig, OptimizerConfig, TrainConfig
import pipeline.train.run as run
from pipeline.train.run import fit_method
from pipeline.train.trainer import seed_everything

run.code_fingerprint = lambda: "fixed"  # other edits of the checkout between the two processes must not start over
ds_dir, ckpt, out = map(Path, sys.argv[1:4])
ctx = BuildContext(dataset_dir=ds_dir, data_root=ds_dir.parent, dataset=DatasetConfig(image_size=16))
cfg = TrainConfig(method="erm", model=ModelConfig(backbone="cifar_resnet8", head="linear"), epochs=2, batch_size=4,
                  optimizer=OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4), lr_schedule="constant",
                  sampler="class_balanced", amp="off", device="cpu", num_workers=0, seed=3, checkpoint_every=2)
seed_everything(cfg.seed)
method = create_method(cfg, ctx)
trainer, _ = fit_method(method, cfg, ctx, ckpt, None)
torch.save({"state": method.state_dict(), "start_step": trainer.start_step}, out)
"""


@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_bit_identical(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    """A real SIGKILL of the process group right after update 11 (checkpoint after 10), then a fresh process."""
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(_VICTIM))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LONGTAIL_TRACKING": "off"}
    env.pop("LONGTAIL_TEST_KILL_AT", None)

    def run(ckpt: str, out: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
        e = {**env, "LONGTAIL_TEST_KILL_AT": kill_at} if kill_at else env
        return subprocess.run([sys.executable, str(script), str(tiny_dataset_dir), str(tmp_path / ckpt),
                               str(tmp_path / out)], env=e, cwd=ROOT, capture_output=True, text=True,
                              start_new_session=True, timeout=300)

    full = run("ckpt_full", "full.pt")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run("ckpt_cut", "cut.pt", kill_at="train:update:11")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "cut.pt").exists()
    state = load_checkpoint(tmp_path / "ckpt_cut" / "checkpoint.pt",
                            torch.load(tmp_path / "ckpt_cut" / "checkpoint.pt", weights_only=True)["config_hash"])
    assert (state["epoch"], state["batch"], state["step"]) == (1, 3, 10)
    resumed = run("ckpt_cut", "cut.pt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = torch.load(tmp_path / "full.pt", weights_only=True), torch.load(tmp_path / "cut.pt", weights_only=True)
    assert b["start_step"] == 10, resumed.stderr[-3000:]
    _same(a["state"], b["state"])
