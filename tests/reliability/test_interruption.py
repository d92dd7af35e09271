"""``teacher@ce`` killed with SIGKILL to its process group (a preempted worker) at many points, then rerun the way
the README says (``python -m pipeline.dvc_locks``, then ``dvc repro``): every time the rerun ends with the weights of
an uninterrupted run (``torch.equal`` on every tensor), with no manual step, no temporary leftovers under ``data/``
and ``checkpoints/``, no stale entry in ``.dvc/tmp/rwlock`` and the outputs in DVC's cache.

Points are hit deterministically: inside the stage through ``LONGTAIL_TEST_KILL_AT`` (``pipeline.io``,
``pipeline.train.checkpoint``), inside DVC through ``dvc_with_kill_points.py``; a few are hit from the outside by
polling (the stage process appearing, the middle of an epoch, the model file appearing).

The repository copy is made as ``tests/integration/test_pipeline.py`` makes it (tracked and untracked, not ignored
files, in its own git + DVC repo); its ``params.yaml`` holds only the dataset (synthetic, 4 classes, 32x32) and one
4-epoch ``ce`` teacher, every other collection empty, so ``dvc repro teacher@ce`` takes seconds. Stage processes run
on one torch thread (tiny models are dominated by thread synchronisation on a loaded CPU) with MLflow off.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC_WITH_KILL_POINTS = Path(__file__).with_name("dvc_with_kill_points.py")
MODEL = Path("data/teachers/ce/model.pt")
CHECKPOINT = Path("checkpoints/teachers/ce/checkpoint.pt")

TINY_PARAMS = {
    "dataset": {"name": "tiny", "source": "synthetic", "num_classes": 4, "images_per_class": 60, "image_size": 32,
                "profile": "exp", "imbalance_factor": 4.0, "n_max": 48, "val_per_class": 0, "test_per_class": 4,
                "many": 30, "few": 15, "seed": 0},
    "teachers": {"ce": {"method": "erm", "model": {"backbone": "cifar_resnet8", "head": "linear"}, "loss": "ce",
                        "epochs": 4, "batch_size": 8,
                        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                        "lr_schedule": "cosine", "sampler": "instance", "transforms": ["standard"], "amp": "off",
                        "device": "cpu", "num_workers": 0, "seed": 0}},
    "students": {}, "index": {}, "rebalance": {}, "memory": {}, "upper_bound": {"recipe": "ce"},
    "seeds": {"replicas": []}, "evaluate": {},
}


def env(repo: Path, **extra: str) -> dict[str, str]:
    e = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID", "LONGTAIL_TEST_KILL_AT", "LONGTAIL_TEST_DVC_KILL_AT"):
        e.pop(key, None)
    e.update(PATH=f"{BIN}{os.pathsep}{e['PATH']}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1",
             LONGTAIL_TRACKING="off", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return e


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env(repo), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def clear_locks(repo: Path) -> subprocess.CompletedProcess:
    """The README's first step after an interruption."""
    return subprocess.run([sys.executable, "-m", "pipeline.dvc_locks"], cwd=repo, env=env(repo), capture_output=True,
                          text=True, check=True, timeout=60)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(reference: dict[str, torch.Tensor], path: Path) -> None:
    got = weights(path)
    assert got.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(reference[k], got[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


_LEFTOVER = re.compile(r"\..*\.(tmp|old).*|\.tmp.*")


def leftovers(repo: Path) -> list[str]:
    """Temporary files and directories of interrupted writes under data/ and checkpoints/."""
    found = []
    for top in ("data", "checkpoints"):
        for path in (repo / top).rglob("*"):
            if _LEFTOVER.fullmatch(path.name):
                found.append(str(path.relative_to(repo)))
    return found


def stale_rwlock(repo: Path) -> dict:
    """What ``.dvc/tmp/rwlock`` still claims (empty when nothing holds a lock)."""
    path = repo / ".dvc/tmp/rwlock"
    if not path.exists():
        return {}
    lock = json.loads(path.read_text() or "{}")
    return {k: v for k, v in lock.items() if v}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, copy_repo) -> Path:
    return copy_repo(tmp_path_factory.mktemp("reliability") / "repo", TINY_PARAMS)


@pytest.fixture(scope="module")
def reference(tiny_repo: Path) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted ``dvc repro teacher@ce``."""
    dvc(tiny_repo, "repro", "teacher@ce")
    return weights(tiny_repo / MODEL)


@pytest.fixture(scope="module")
def epoch_time(tiny_repo: Path, reference: dict) -> float:
    timings = json.loads((tiny_repo / "data/timings/teacher@ce.json").read_text())  # outside the DVC outputs
    return timings["train_time_s"] / timings["epochs_trained"]


pytestmark = pytest.mark.slow

# name: (who kills, point, the epoch the rerun resumes after: None = trains from scratch, "-" = not checked)
POINTS = {
    "stage_process_start": ("outside", "stage_started", None),
    "before_first_checkpoint": ("stage", "checkpoint:load", None),
    "writing_first_checkpoint": ("stage", "checkpoint:tmp:1", None),
    "after_first_checkpoint": ("stage", "checkpoint:saved:1", 1),
    "mid_epoch": ("outside", "mid_epoch", "-"),
    "after_last_checkpoint": ("stage", "checkpoint:saved:4", 4),
    "export_half_written": ("stage", "write_json:metrics.json", 4),
    "export_complete_not_renamed": ("stage", "atomic_dir:full", 4),
    "model_file_appeared": ("outside", "model_appeared", "-"),
    "dvc_before_command": ("dvc", "cmd_run", None),
    "dvc_hashing_outputs": ("dvc", "save", 4),
    "dvc_caching_outputs": ("dvc", "commit", 4),
    "dvc_writing_lockfile": ("dvc", "dump", 4),
    "dvc_after_lockfile": ("dvc", "dumped", "-"),
}
# Close variants of the points above, run only with LONGTAIL_RELIABILITY_ALL=1 (each costs ~10 s).
MORE_POINTS = {
    "writing_last_checkpoint": ("stage", "checkpoint:tmp:4", 3),
    "export_started": ("stage", "atomic_dir:start", 4),
    "export_renamed_stage_running": ("stage", "atomic_dir:done", 4),
}
_ALL = os.environ.get("LONGTAIL_RELIABILITY_ALL") == "1"


def _fresh(repo: Path) -> None:
    """Forget the teacher's outputs and checkpoint, so that the next repro trains it from scratch."""
    for d in ("data/teachers/ce", "checkpoints/teachers/ce"):
        subprocess.run(["rm", "-rf", str(repo / d)], check=True)


def _stage_started(proc: subprocess.Popen) -> bool:
    try:
        return any("stages.teacher" in " ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(True))
    except psutil.Error:
        return False


def killed_run(repo: Path, who: str, point: str, epoch_time: float = 0.2, reap: bool = True) -> subprocess.Popen:
    """Start ``dvc repro teacher@ce`` in its own session and have it SIGKILLed (its whole group) at ``point``."""
    extra = {"stage": {"LONGTAIL_TEST_KILL_AT": point}, "dvc": {"LONGTAIL_TEST_DVC_KILL_AT": point}}.get(who, {})
    log = open(repo / f"killed-{point.replace(':', '_')}.log", "w")  # noqa: SIM115 (the child writes it)
    proc = subprocess.Popen([sys.executable, str(DVC_WITH_KILL_POINTS), "repro", "teacher@ce"], cwd=repo,
                            env=env(repo, **extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    if who == "outside":
        ready = {"stage_started": lambda: _stage_started(proc), "mid_epoch": (repo / CHECKPOINT).exists,
                 "model_appeared": (repo / MODEL).exists}[point]
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if point == "mid_epoch":
            time.sleep(epoch_time / 2)
        os.killpg(proc.pid, signal.SIGKILL)
    if reap:
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {point}:\n{_log(repo, point)}"
    else:  # wait until it is a zombie: dead, still holding its rwlock entries, not reaped
        deadline = time.monotonic() + 120
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
    return proc


def _log(repo: Path, point: str) -> str:
    return (repo / f"killed-{point.replace(':', '_')}.log").read_text()[-3000:]


def recover(repo: Path) -> str:
    """The README's recipe after an interruption; returns what it printed."""
    cleared = clear_locks(repo)
    out = dvc(repo, "repro", "teacher@ce")
    return cleared.stdout + out.stdout + out.stderr


def assert_clean(repo: Path) -> None:
    """No temporary leftovers, no stale rwlock entry, and the teacher's output committed to DVC's cache."""
    assert leftovers(repo) == []
    assert stale_rwlock(repo) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["teacher@ce"]
    out = next(o for o in lock["outs"] if o["path"] == "data/teachers/ce")
    cache = repo / ".dvc/cache/files/md5"
    listing = json.loads((cache / out["md5"][:2] / out["md5"][2:]).read_text())
    assert sorted(e["relpath"] for e in listing) == sorted(p.name for p in (repo / "data/teachers/ce").iterdir())
    assert all((cache / e["md5"][:2] / e["md5"][2:]).is_file() for e in listing), "an output file is not cached"


@pytest.mark.parametrize("name", [*POINTS, *(MORE_POINTS if _ALL else ())])  # LONGTAIL_RELIABILITY_ALL=1: 3 more
def test_killed_run_resumes_to_the_same_weights(tiny_repo: Path, reference: dict, epoch_time: float,
                                                 name: str) -> None:
    who, point, resumed_after = {**POINTS, **MORE_POINTS}[name]
    _fresh(tiny_repo)
    killed_run(tiny_repo, who, point, epoch_time)
    if point == "mid_epoch":
        done = weights(tiny_repo / CHECKPOINT)["epoch"]
        assert 1 <= done < 4 and not (tiny_repo / MODEL).exists(), "the kill must land mid-training"
        resumed_after = done
    printed = recover(tiny_repo)
    if resumed_after is None:
        assert "resuming from checkpoint" not in printed, printed[-3000:]
    elif resumed_after != "-":
        resumed = f"resuming from checkpoint {CHECKPOINT} after epoch {resumed_after} of 4" in printed
        # Killed inside DVC after the command wrote its outputs: they are bit for bit those of the lock entry an
        # earlier run in this repository wrote (outputs hold nothing run-specific), so DVC rightly skips the stage.
        up_to_date = who == "dvc" and "Stage 'teacher@ce' didn't change, skipping" in printed
        assert resumed or up_to_date, printed[-3000:]
    assert_same_weights(reference, tiny_repo / MODEL)
    assert_clean(tiny_repo)


def test_unreaped_then_killed_again_while_resuming(tiny_repo: Path, reference: dict) -> None:
    """Rerun while the killed dvc is still a zombie (DVC's own check thinks it alive and reports the output busy;
    dvc_locks clears it), kill the resumed run too, then recover."""
    _fresh(tiny_repo)
    first = killed_run(tiny_repo, "stage", "checkpoint:saved:2", reap=False)
    try:
        cleared = clear_locks(tiny_repo).stdout
        assert f"dead PID {first.pid}" in cleared, cleared
        killed_run(tiny_repo, "stage", "checkpoint:saved:3")
    finally:
        first.wait(timeout=60)
    assert "after epoch 2 of 4" in _log(tiny_repo, "checkpoint:saved:3")
    printed = recover(tiny_repo)
    assert f"resuming from checkpoint {CHECKPOINT} after epoch 3 of 4" in printed, printed[-3000:]
    assert_same_weights(reference, tiny_repo / MODEL)
    assert_clean(tiny_repo)
