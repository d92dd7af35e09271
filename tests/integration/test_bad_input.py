"""Bad input to a stage: a one-line error naming the setting or file, a non-zero exit, and no output written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.compose import compose

ROOT = Path(__file__).resolve().parents[2]


def stage(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LONGTAIL_TRACKING="off", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write(cwd: Path, params: dict) -> None:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def run_edited(cwd: Path, params: dict, edit, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run a stage with ``edit(copy of params)`` as params.yaml, then put the good params back."""
    bad = yaml.safe_load(yaml.safe_dump(params))
    edit(bad)
    write(cwd, bad)
    try:
        return stage(cwd, module, *args)
    finally:
        write(cwd, params)


@pytest.fixture(scope="module")
def params() -> dict:
    p = compose(ROOT / "conf")
    p["dataset"].update(source="synthetic", num_classes=4, images_per_class=30, n_max=12, val_per_class=2,
                        test_per_class=4, many=8, few=4)
    return p


@pytest.fixture(scope="module")
def with_dataset(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Path:
    cwd = tmp_path_factory.mktemp("with_dataset")
    write(cwd, params)
    proc = stage(cwd, "dataset")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd


def test_missing_data_root(tmp_path: Path, params: dict) -> None:
    params = {**params, "dataset": {**params["dataset"], "source": "cifar10", "root": str(tmp_path / "nowhere")}}
    write(tmp_path, params)
    assert_one_line_error(stage(tmp_path, "dataset"), "nowhere")
    assert not (tmp_path / "data").exists()


def test_unknown_params_key(tmp_path: Path, params: dict) -> None:
    write(tmp_path, {**params, "dataset": {**params["dataset"], "imbalance_factr": 10}})
    assert_one_line_error(stage(tmp_path, "dataset"), "imbalance_factr", "imbalance_factor")
    assert not (tmp_path / "data").exists()


def test_imbalance_factor_below_one(tmp_path: Path, params: dict) -> None:
    write(tmp_path, {**params, "dataset": {**params["dataset"], "imbalance_factor": 0.5}})
    assert_one_line_error(stage(tmp_path, "dataset"), "imbalance_factor")
    assert not (tmp_path / "data").exists()


def test_unknown_backbone(with_dataset: Path, params: dict) -> None:
    proc = run_edited(with_dataset, params, lambda p: p["teachers"]["ce"]["model"].update(
        backbone="resnet_does_not_exist"), "teacher", "--name", "ce")
    assert_one_line_error(proc, "resnet_does_not_exist", "backbone")
    assert not (with_dataset / "data/teachers").exists()


def test_index_k_larger_than_the_index(with_dataset: Path, params: dict) -> None:
    proc = run_edited(with_dataset, params, lambda p: p["index"]["ce"].update(k=10_000), "index", "--name", "ce")
    assert_one_line_error(proc, "k=10000")
    assert not (with_dataset / "data/index").exists()


def test_student_naming_a_missing_teacher(with_dataset: Path, params: dict) -> None:
    proc = run_edited(with_dataset, params, lambda p: p["students"]["cbd"]["method_args"].update(teachers=["nobody"]),
                      "student", "--name", "cbd")
    assert_one_line_error(proc, "teachers/nobody")
    assert not (with_dataset / "data/students").exists()


def test_rebalance_of_an_unknown_model(with_dataset: Path, params: dict) -> None:
    name = next(iter(params["rebalance"]))
    proc = run_edited(with_dataset, params, lambda p: p["rebalance"][name].update(model="teachers/ghost"),
                      "rebalance", "--name", name)
    assert_one_line_error(proc, "teachers/ghost")
    assert not (with_dataset / "data/rebalance").exists() and not (with_dataset / "checkpoints").exists()


def test_unknown_entry_name(with_dataset: Path, params: dict) -> None:
    write(with_dataset, params)
    assert_one_line_error(stage(with_dataset, "teacher", "--name", "nope"), "teachers.nope", "ce")
