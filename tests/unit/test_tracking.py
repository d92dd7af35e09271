"""Tracker interface: NullTracker is a no-op; MLflowTracker writes one run per stage to a temp SQLite store.

Also the MLflow side of a training stage: the experiment's kind (what the MLflow 3 UI opens it as), a logged model
that loads back (``mlflow.pytorch.load_model`` and ``load_network``) with the same logits, the dataset input and the
evaluate table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.tracking import (
    EXPERIMENT,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
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
        assert t.log_model(torch.nn.Linear(2, 2), "/nonexistent", input_example=np.zeros((1, 2))) is None
        t.log_dataset({"class": ["a"]}, name="d", digest="0", source="/nonexistent")
        t.log_table({"model": ["a"], "all": [0.5]}, "tables/x.json")
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
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_existing_experiment_without_kind_gets_it(store):
    """An experiment made before the kind existed gets it from init_store; a kind a user chose (in the UI) stays."""
    import mlflow

    root, uri = store
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("legacy")
    mine = client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert init_store(root, "legacy") == uri
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    init_store(root, "mine")
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


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


def _tiny_network():
    """A cifar_resnet8 Network with BN statistics moved off their init (the round trip must carry the buffers)."""
    from pipeline.models.network import create_network

    torch.manual_seed(0)
    net = create_network({"backbone": {"name": "cifar_resnet8"}, "neck": {"dim": 16}, "head": {"name": "cosine"},
                          "normalize_features": True, "num_classes": 4})
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 16, 16) * 3 + 1)
    return net.eval()


def test_log_model_loads_back_with_the_same_logits(store, tmp_path):
    import mlflow
    import mlflow.pytorch
    from mlflow.entities import LoggedModelStatus
    from mlflow.utils import requirements_utils

    from pipeline.models.network import Network, load_network, save_network

    root, uri = store
    net = _tiny_network()
    save_network(net, tmp_path / "out")
    example = torch.randn(3, 3, 16, 16).numpy()
    with create_tracker("teacher@tiny", "teacher-tiny", {"model": "tiny"}, repo_root=root) as tr:
        tr.log_metrics({"test/all": 0.5}, step=2)
        tr.log_metrics({"train/loss": 1.0}, step=1)
        before = requirements_utils._MODULES_TO_PACKAGES
        t0 = time.perf_counter()
        model_uri = tr.log_model(net, tmp_path / "out", input_example=example, step=2)
        elapsed = time.perf_counter() - t0
        run_id = tr.run_id
    assert model_uri is not None and model_uri.startswith("models:/")
    assert elapsed < 10, elapsed  # ~0.1-0.3 s here; generous for a loaded CI machine
    assert not net.training
    assert requirements_utils._MODULES_TO_PACKAGES is before  # the shortcut is undone (see _pinned_requirements_check)

    client = mlflow.MlflowClient(uri)
    model_id = model_uri.split("/", 1)[1]
    logged = client.get_logged_model(model_id)
    assert logged.name == "teacher-tiny" and logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    assert logged.experiment_id == client.get_run(run_id).info.experiment_id  # not the Default experiment
    assert logged.tags["model"] == "tiny" and logged.tags["stage"] == "teacher@tiny"
    assert [(m.key, m.step, m.value) for m in logged.metrics] == [("test/all", 2, 0.5)]  # the metrics at its step
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]

    x = torch.from_numpy(example)
    with torch.no_grad():
        expected = net(x)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(model_uri)
    assert isinstance(loaded, Network) and not loaded.training
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl"))
    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert {"MLmodel", "data/model.pth", "extra_files/model.json", "extra_files/model.pt", "input_example.json",
            "serving_input_example.json", "requirements.txt"} <= files
    rebuilt = load_network(f"{local}/extra_files")  # the project's own loader, weights_only=True
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(rebuilt(x), expected)
    spec = json.loads((Path(local) / "extra_files" / "model.json").read_text())
    assert spec["backbone"] == {"name": "cifar_resnet8"} and spec["num_classes"] == 4

    mlmodel = mlflow.models.get_model_info(model_uri)
    assert mlmodel.flavors["pytorch"]["pytorch_version"] == torch.__version__
    assert mlmodel.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 16, 16)
    reqs = (Path(local) / "requirements.txt").read_text().split()
    assert f"torch=={version('torch')}" in reqs and f"mlflow=={mlflow.__version__}" in reqs
    served = mlflow.pyfunc.load_model(model_uri).predict(example)
    np.testing.assert_allclose(served, expected.numpy(), rtol=0, atol=1e-6)


def test_log_model_failure_is_a_warning(store, tmp_path, caplog):
    root, _ = store

    class Unpicklable(torch.nn.Linear):
        def __reduce_ex__(self, protocol):
            raise TypeError("cannot pickle this")

    with create_tracker("teacher@bad", "bad", repo_root=root) as tr:
        assert tr.log_model(Unpicklable(2, 2), tmp_path, input_example=np.zeros((1, 2), np.float32)) is None
    assert "Could not log bad to MLflow" in caplog.text


def test_log_dataset_and_table(store):
    import mlflow

    root, uri = store
    with create_tracker("evaluate", "evaluate", repo_root=root) as tr:
        tr.log_dataset({"class": ["a", "b"], "train_count": [10, 2], "shot_group": ["many", "few"]},
                       name="tiny_lt", digest="0123456789abcdef0123456789abcdef", source="/data/dataset/manifest.json")
        tr.log_table({"model": ["teachers/ce", "teachers/bs"], "head": ["main", "main"], "all": [0.5, 0.6],
                      "few": [float("nan"), 0.25]}, "tables/comparison.json")
        run_id = tr.run_id
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "tiny_lt" and inp.dataset.digest == "0123456789abcdef0123456789abcdef"
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train"}
    assert json.loads(inp.dataset.profile)["num_rows"] == 2
    assert [c["name"] for c in json.loads(inp.dataset.schema)["mlflow_colspec"]] == ["class", "train_count",
                                                                                     "shot_group"]
    table = json.loads(open(client.download_artifacts(run_id, "tables/comparison.json")).read())
    assert table["columns"] == ["model", "head", "all", "few"]
    assert table["data"] == [["teachers/ce", "main", 0.5, None], ["teachers/bs", "main", 0.6, 0.25]]
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "tables/comparison.json",
                                                                    "type": "table"}]


def test_write_outputs_logs_model_dataset_and_final_metrics(store, make_train_config, build_ctx, tmp_path):
    """A training stage's run, through ``train_and_export``: final metrics at the model's step, the model (its input
    example is the first test images, preprocessed), the dataset input named and digested by the manifest."""
    import hashlib

    import mlflow

    from pipeline.config import as_dict
    from pipeline.evaluate.predict import load_predictions
    from pipeline.train.run import train_and_export

    root, uri = store
    out = tmp_path / "teachers" / "tiny"
    cfg = make_train_config(epochs=2)
    with create_tracker("teacher@tiny", "teacher-tiny", repo_root=root) as tr:
        tr.log_params(as_dict(cfg))  # as stages._cli.train_stage does
        summary = train_and_export(cfg, build_ctx, out, tmp_path / "ckpt", tr)
        assert summary is not None
        run_id = tr.run_id
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "test/all")] == [
        (2, summary["test"]["main"]["all"])]
    (inp,) = run.inputs.dataset_inputs
    manifest = build_ctx.dataset_dir / "manifest.json"
    assert inp.dataset.name == "tiny" and inp.dataset.digest == hashlib.md5(manifest.read_bytes()).hexdigest()
    assert json.loads(inp.dataset.profile)["num_rows"] == 4  # one row per class
    (output,) = run.outputs.model_outputs
    assert output.step == 2
    model = client.get_logged_model(output.model_id)
    assert {m.key for m in model.metrics} >= {"test/all", "test/many", "test/few"}
    assert model.params["epochs"] == "2"  # the run's config travels with the model

    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{output.model_id}", dst_path=str(tmp_path / "dl"))
    example = json.loads(open(f"{local}/input_example.json").read())
    x = torch.tensor(np.asarray(example["inputs"] if isinstance(example, dict) else example, dtype=np.float32))
    assert x.shape == (4, 3, 16, 16)
    logits = mlflow.pytorch.load_model(f"models:/{output.model_id}")(x).detach().numpy()
    stored = load_predictions(out)["test/main"][:4]  # what the stage wrote for the same first test images
    np.testing.assert_allclose(logits, stored, rtol=0, atol=1e-5)


def test_evaluate_tables_cover_every_model_head_and_seed_group():
    """The evaluate run's MLflow tables: one row per model and head with each shot group (and its gap closed), and
    the seed-aggregated table (mean, std, beyond 2 SE of CE) only when some model has several seeds."""
    from stages.evaluate import _comparison_tables

    groups = ("all", "many", "medium", "few")
    acc = {"all": 0.5, "many": 0.9, "medium": 0.4, "few": float("nan")}
    report = {"models": {"teachers/ce": acc, "students/rac:fused": acc},
              "gap_closed": {"models": {"students/rac:fused": {"all": 0.1, "many": None, "medium": 0.2, "few": 0.3}}},
              "seeds": {k: {"n": 1, **{g: {"mean": acc[g], "std": float("nan")} for g in groups}}
                        for k in ("teachers/ce", "students/rac:fused")}}
    tables = _comparison_tables(report)
    assert list(tables) == ["comparison"]
    comparison = tables["comparison"]
    assert comparison["model"] == ["teachers/ce", "students/rac"]
    assert comparison["head"] == ["main", "fused"]
    assert comparison["gap_closed_all"] == [None, 0.1] and comparison["many"] == [0.9] * 2
    report["seeds"] = {k: {"n": 3, **{g: {"mean": 0.5, "std": 0.01} for g in groups}} for k in report["models"]}
    report["vs_baseline"] = {"students/rac:fused": {g: {"significant": g == "all"} for g in groups}}
    seeds = _comparison_tables(report)["seeds"]
    assert seeds["model"] == ["teachers/ce", "students/rac:fused"] and seeds["seeds"] == [3, 3]
    assert seeds["all_mean"] == [0.5, 0.5] and seeds["few_std"] == [0.01, 0.01]
    assert seeds["all_beyond_2se"] == [None, True] and seeds["many_beyond_2se"] == [None, False]
