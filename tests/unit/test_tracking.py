"""Tracker interface: NullTracker is a no-op; MLflowTracker writes one run per stage to a temp SQLite store."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline import tracking
from pipeline.tracking import (
    EXPERIMENT,
    NullTracker,
    Tracker,
    create_tracker,
    default_tracking_uri,
    flatten_params,
    init_store,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A repo-like temp dir with an initialised store; env cleaned of tracking variables."""
    root = tmp_path_factory.mktemp("repo")
    (root / ".dvc").mkdir()
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID", "LONGTAIL_TRACKING")}
    uri = init_store(root)
    import mlflow

    mlflow.set_tracking_uri(uri)  # for mlflow.search_runs (the fluent API's global URI)
    yield root, uri
    mlflow.set_tracking_uri(None)
    for k, v in saved.items():
        if v is not None:
            os.environ[k] = v


def test_null_tracker_is_a_noop(monkeypatch):
    monkeypatch.setenv("LONGTAIL_TRACKING", "off")
    tr = create_tracker("teacher@r32", "r32", {"model": "r32"})
    assert isinstance(tr, NullTracker) and isinstance(tr, Tracker)
    with tr as t:
        t.log_params({"a": {"b": 1}})
        t.log_metrics({"loss": 1.0}, step=3)
        t.log_artifact("/nonexistent/file")
        t.set_tags({"x": "y"})
    tr.close("FAILED")
    assert tr.run_id is None


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": {}}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": "x",
        "f": "{}",
    }


def test_default_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(".") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_init_store_is_idempotent_and_fast(store):
    root, uri = store
    assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
    assert (root / "mlflow.db").is_file()
    import time

    t0 = time.perf_counter()
    assert init_store(root) == uri
    assert time.perf_counter() - t0 < 0.5
    import mlflow

    exp = mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location == f"{(root / 'mlartifacts').resolve().as_uri()}/{EXPERIMENT}"


def test_mlflow_run_params_metrics_tags_artifact(store, tmp_path, monkeypatch):
    import mlflow

    root, uri = store
    monkeypatch.setenv("DVC_STAGE", "teacher@r32")
    artifact = tmp_path / "metrics.json"
    artifact.write_text('{"all": 0.5}')
    with create_tracker("teacher@r32", "r32", {"model": "r32", "dataset": "digits_lt"}, repo_root=root) as tr:
        tr.log_params({"teachers": {"r32": {"epochs": 2, "lr": 0.1}}, "long": "x" * 10_000})
        for step, loss in enumerate([2.0, 1.5, 1.0]):
            tr.log_metrics({"train/loss": loss, "acc@1": float("nan")}, step=step)
        tr.log_metrics({"test/few": math.nan, "test/all": 0.75})
        tr.set_tags({"seed": 0})
        tr.log_artifact(artifact)
        run_id = tr.run_id

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["teachers.r32.epochs"] == "2" and run.data.params["teachers.r32.lr"] == "0.1"
    assert len(run.data.params["long"]) <= 6000 and run.data.params["long"].endswith("...")
    assert run.data.tags["stage"] == "teacher@r32" and run.data.tags["dvc_stage"] == "teacher@r32"
    assert run.data.tags["model"] == "r32" and run.data.tags["dataset"] == "digits_lt" and run.data.tags["seed"] == "0"
    assert "mlflow.parentRunId" not in run.data.tags
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert run.data.metrics["test/all"] == 0.75
    assert "acc_1" not in run.data.metrics and "test/few" not in run.data.metrics  # NaN skipped
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]
    assert run.info.artifact_uri.startswith((root / "mlartifacts").resolve().as_uri())

    df = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="tags.stage = 'teacher@r32'")
    assert run_id in set(df["run_id"])


def test_failed_block_marks_run_failed(store):
    import mlflow

    root, uri = store
    with pytest.raises(RuntimeError):
        with create_tracker("student@x", "x", repo_root=root) as tr:
            raise RuntimeError("boom")
    assert mlflow.MlflowClient(uri).get_run(tr.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="valid: FINISHED, FAILED, KILLED"):
        tracking.MLflowTracker("s", "s", repo_root=root).close("DONE")


def test_parent_child_across_processes(store):
    """A parent run in this process, a stage run in a subprocess that only sees LONGTAIL_PARENT_RUN_ID."""
    import mlflow

    root, uri = store
    with create_tracker("pipeline", "pipeline", repo_root=root, parent_run_id="") as parent:
        code = textwrap.dedent(
            """
            from pipeline.tracking import create_tracker
            with create_tracker("evaluate", "evaluate") as tr:
                tr.log_metrics({"all": 0.9})
                print(tr.run_id)
            """
        )
        env = {
            **os.environ,
            "LONGTAIL_PARENT_RUN_ID": parent.run_id,
            "DVC_ROOT": str(root),
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        child_id = out.stdout.strip().splitlines()[-1]
    df = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert list(df["run_id"]) == [child_id]
    assert df["metrics.all"].iloc[0] == 0.9
