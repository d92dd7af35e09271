"""A training stage under torchrun: ``nproc: 2`` in its params makes DVC's unchanged command
(``python -m stages.teacher --name ce``) rerun itself on two gloo ranks (CPU). Rank 0 alone writes the outputs, the
checkpoint and the one MLflow run; the result matches the same recipe on one process within noise."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.test_interruption import TINY_PARAMS

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _env(repo: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID")}
    e.update(PATH=f"{BIN}{os.pathsep}{e['PATH']}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1",
             LONGTAIL_TRACKING="on", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    return e


def test_teacher_stage_runs_on_two_gloo_ranks(tmp_path: Path, copy_repo) -> None:
    params = copy.deepcopy(TINY_PARAMS)
    ce = params["teachers"]["ce"]
    ce.update(epochs=6, batch_size=8)
    params["teachers"] = {"ce": {**ce, "nproc": 2}, "ce1": dict(ce)}  # the same recipe on 2 ranks and on 1
    repo = copy_repo(tmp_path / "repo", params)
    subprocess.run([sys.executable, "-c", "from pipeline.tracking import init_store; init_store('.')"], cwd=repo,
                   env=_env(repo), check=True)
    out = {}
    for name in ("ce", "ce1"):
        proc = subprocess.run([str(BIN / "dvc"), "repro", f"teacher@{name}"], cwd=repo, env=_env(repo),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out[name] = proc.stdout + proc.stderr
    log = out["ce"]
    assert "relaunching under torchrun" in log and "--nproc_per_node 2 -m stages.teacher --name ce" in log
    assert "rank 0 of 2 (gloo)" in log and "rank 1 of 2 (gloo)" in log
    assert "relaunching" not in out["ce1"]
    metrics = {n: json.loads((repo / f"data/teachers/{n}/metrics.json").read_text()) for n in ("ce", "ce1")}
    assert metrics["ce"]["epochs"] == 6 and (repo / "checkpoints/teachers/ce/checkpoint.pt").is_file()
    # 16 test images, 4 classes: one image is 6 points; two ranks differ from one process only by BN batch statistics
    assert abs(metrics["ce"]["test"]["main"]["all"] - metrics["ce1"]["test"]["main"]["all"]) <= 0.25
    leftovers = [p.name for p in (repo / "data/teachers").rglob("*") if ".tmp" in p.name]
    assert not leftovers
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["longtail-pipeline"])
    assert sorted(runs["tags.stage"]) == ["dataset", "teacher@ce", "teacher@ce1"]  # rank 1 logged nothing
