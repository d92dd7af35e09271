"""An identical retrain stops the cascade: forcing ``teacher@ce`` to train again from scratch with the same inputs
writes the same bytes, so its ``dvc.lock`` entry is unchanged, every downstream stage (its index, its rebalances,
evaluate) stays up to date in ``dvc status``, and none of them logs another MLflow run.

The stage outputs hold nothing run-specific: wall times go to MLflow and to ``data/timings/<stage>.json``, outside
every DVC output. The repository copy is made as ``tests/integration/test_pipeline.py`` makes it, on a tiny synthetic
dataset (4 classes, 32x32) with one 2-epoch CE teacher, its index, its NCM rebalance, the balanced upper bound and
evaluate (no students nor memory edits: their folders are empty); stage processes run on one torch thread, so a
retrain is bit-identical. The first run has MLflow off (stage start-up is most of this test's time); the forced rerun
logs to MLflow, where a downstream stage that ran would show up as a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DATASET = {"name": "tiny", "source": "synthetic", "num_classes": 4, "images_per_class": 60, "image_size": 32,
           "profile": "exp", "imbalance_factor": 4.0, "n_max": 48, "val_per_class": 4, "test_per_class": 4,
           "many": 30, "few": 15, "seed": 0}
TRAIN = {"epochs": 2, "batch_size": 16, "amp": "off", "device": "cpu", "num_workers": 0}


def env(repo: Path, tracking: str = "on") -> dict[str, str]:
    e = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID", "LONGTAIL_RUN_TAGS"):
        e.pop(key, None)
    e.update(PATH=f"{BIN}{os.pathsep}{e['PATH']}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1",
             MLFLOW_DISABLE_TELEMETRY="true", LONGTAIL_TRACKING=tracking, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return e


def dvc(repo: Path, *args: str, tracking: str = "on") -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env(repo, tracking), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def tiny_params(repo: Path) -> dict:
    """The composed params cut down to one teacher and what reads it, every training at most 2 epochs."""
    sys.path.insert(0, str(repo))
    try:
        from pipeline import compose as composer

        params = composer.compose(repo / "conf")
        ce = {**params["teachers"]["ce"], **TRAIN}
        params.update(
            dataset={**params["dataset"], **DATASET},
            teachers={"ce": ce},
            students={},
            memory={},
            index={"ce": {**params["index"]["ce"], "k": 5}},
            rebalance={"ce-ncm": params["rebalance"]["ce-ncm"]},
            evaluate={**params["evaluate"], "ensembles": {}},
        )
        params["dataset"].pop("root", None)
        if "reads" in params:  # the deps each stage reads, derived from the entries (pipeline/compose.py)
            params["reads"] = composer.stage_reads(params)
    finally:
        sys.path.remove(str(repo))
    return params


def stage_runs(repo: Path) -> Counter:
    """MLflow runs per ``stage`` tag in the repo's store."""
    if not (repo / "mlflow.db").is_file():
        return Counter()
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as con:
        return Counter(v for (v,) in con.execute("SELECT value FROM tags WHERE key = 'stage'"))


def lock_entry(repo: Path, stage: str) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, copy_repo) -> Path:
    dst = copy_repo(tmp_path_factory.mktemp("rerun") / "repo", {})
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params(dst), sort_keys=False))
    for empty in ("students", "memory"):  # evaluate reads them
        (dst / "data" / empty).mkdir(parents=True)
    dvc(dst, "repro", tracking="off")
    return dst


def test_identical_retrain_reruns_nothing_downstream(repo: Path) -> None:
    assert json.loads(dvc(repo, "status", "--json")) == {}
    before = lock_entry(repo, "teacher@ce")

    shutil.rmtree(repo / "checkpoints/teachers/ce")  # a real retrain from scratch, not a resume of the finished run
    dvc(repo, "repro", "--force", "--single-item", "teacher@ce")

    assert lock_entry(repo, "teacher@ce") == before  # model, metrics, history and checkpoint: the same bytes
    assert json.loads(dvc(repo, "status", "--json")) == {}  # nothing downstream is out of date
    assert stage_runs(repo) == {"teacher@ce": 1}  # the rerun itself, and no run of a stage downstream
    # The wall times are kept, outside the outputs.
    timings = json.loads((repo / "data/timings/teacher@ce.json").read_text())
    assert timings["train_time_s"] > 0 and timings["epochs_trained"] == 2
    for name in ("metrics.json", "history.json"):
        assert "time" not in (repo / "data/teachers/ce" / name).read_text()
    assert "time" not in (repo / "data/index/ce/stats.json").read_text()
