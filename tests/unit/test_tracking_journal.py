"""A journaled run replayed into MLflow equals the run logged directly (pipeline.tracking.journal).

The same tracker calls (nested params, metrics over steps with NaN, file and directory artifacts, tags, a dataset
input, a table and a cifar_resnet8 model with an input example) go once through ``MLflowTracker`` and once through
``JournalTracker`` + ``replay_journal`` into one temp SQLite store; the two runs must hold the same params, metric
histories, tags, artifacts, dataset inputs and logged model. A journal is written without importing mlflow (checked in
a subprocess); a journal without its close record ends KILLED; a record that cannot be replayed is one warning.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.tracking import (
    EXPERIMENT,
    JOURNAL_ENV,
    JournalTracker,
    MLflowTracker,
    Tracker,
    create_tracker,
    init_store,
    read_journal,
    replay_journal,
)

ROOT = Path(__file__).resolve().parents[2]
# Tags that legitimately differ between two runs of the same calls (ids mlflow makes).
_OWN_TAGS = {"mlflow.runName"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A repo-like temp dir with an initialised store; tracking on, with the env tags a flow run's stage sees."""
    root = tmp_path_factory.mktemp("repo")
    (root / ".dvc").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID", "LONGTAIL_TRACKING", JOURNAL_ENV):
            mp.delenv(key, raising=False)
        mp.setenv("DVC_STAGE", "teacher@tiny")
        mp.setenv("LONGTAIL_RUN_TAGS", json.dumps({"flow_run": "journal-test"}))
        uri = init_store(root)
        yield root, uri


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small cifar_resnet8 Network saved with save_network, and a (3, 3, 16, 16) input example."""
    from pipeline.models.network import create_network, save_network

    torch.manual_seed(0)
    net = create_network({"backbone": {"name": "cifar_resnet8"}, "neck": {"dim": 16}, "head": {"name": "cosine"},
                          "normalize_features": True, "num_classes": 4})
    with torch.no_grad():
        net(torch.randn(8, 3, 16, 16) * 3 + 1)  # BN statistics off their init
    net.eval()
    out = tmp_path_factory.mktemp("model")
    save_network(net, out)
    return net, out, torch.randn(3, 3, 16, 16).numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An artifact file and a directory of plots."""
    d = tmp_path_factory.mktemp("files")
    (d / "metrics.json").write_text('{"all": 0.5}')
    (d / "plots").mkdir()
    (d / "plots" / "a.png").write_bytes(b"\x89PNG a")
    (d / "plots" / "b.png").write_bytes(b"\x89PNG b")
    return d


def _log_everything(tracker: Tracker, files: Path, model) -> None:
    net, model_dir, example = model
    params = {"teachers": {"tiny": {"epochs": 2, "lr": 0.1, "milestones": (1, 2)}}, "empty": {}, "long": "x" * 9000}
    tracker.log_params(params)
    params["teachers"]["tiny"]["epochs"] = 99  # a later change must not reach the run
    for step, loss in enumerate([2.0, 1.5, 1.0]):
        tracker.log_metrics({"train/loss": loss, "acc@1": float("nan")}, step=step)
    tracker.log_metrics({"test/all": np.float32(0.75), "test/few": math.nan, "test/many": torch.tensor(0.5)}, step=3)
    tracker.set_tags({"seed": 0, "model": "tiny"})
    tracker.log_artifact(files / "metrics.json")
    tracker.log_artifact(files / "plots", "plots")
    tracker.log_dataset({"class": ["a", "b", "c", "d"], "train_count": [12, 7, 4, 3],
                         "shot_group": ["many", "many", "few", "few"]},
                        name="tiny", digest="0123456789abcdef0123456789abcdef", source="/data/dataset/manifest.json")
    tracker.log_table({"model": ["teachers/ce", "teachers/bs"], "all": [0.5, 0.6], "few": [float("nan"), 0.25]},
                      "tables/comparison.json")
    tracker.log_model(net, model_dir, input_example=example, step=3)


def _run_state(client, run_id: str) -> dict:
    """What a user sees of a run, without what mlflow makes anew for every run (ids, times)."""
    run = client.get_run(run_id)

    def artifacts(path: str | None = None) -> list[str]:
        found = []
        for info in client.list_artifacts(run_id, path):
            found += artifacts(info.path) if info.is_dir else [info.path]
        return sorted(found)

    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    return {
        "status": run.info.status,
        "name": run.info.run_name,
        "params": run.data.params,
        "metrics": {k: [(m.key, m.value, m.step) for m in client.get_metric_history(run_id, k)]
                    for k in run.data.metrics},
        "tags": {k: v for k, v in run.data.tags.items() if k not in _OWN_TAGS},
        "artifacts": artifacts(),
        "datasets": [(d.dataset.name, d.dataset.digest, d.dataset.source, d.dataset.schema, d.dataset.profile,
                      sorted((t.key, t.value) for t in d.tags)) for d in run.inputs.dataset_inputs],
        "model": (output.step, logged.name, logged.params, logged.tags, logged.status,
                  sorted((m.key, m.step, m.value) for m in logged.metrics)),
    }


def test_replayed_run_equals_the_direct_run(store, files, model, tmp_path):
    import mlflow
    import mlflow.pytorch

    root, uri = store
    with MLflowTracker("teacher@tiny", "teacher-tiny", {"method": "erm"}, repo_root=root) as direct:
        _log_everything(direct, files, model)
    journal = tmp_path / "journal"
    with JournalTracker(journal, "teacher@tiny", "teacher-tiny", {"method": "erm"}, repo_root=root) as tr:
        assert isinstance(tr, Tracker) and tr.run_id is None
        _log_everything(tr, files, model)
    records = read_journal(journal)
    assert [r["kind"] for r in records][0] == "start" and records[-1]["kind"] == "close"
    run_id = replay_journal(journal)
    assert run_id is not None and run_id != direct.run_id
    assert not journal.exists()  # deleted after a successful replay

    client = mlflow.MlflowClient(uri)
    expected, got = _run_state(client, direct.run_id), _run_state(client, run_id)
    assert got == expected
    assert got["params"]["teachers.tiny.epochs"] == "2" and got["params"]["teachers.tiny.milestones"] == "(1, 2)"
    assert "acc_1" not in got["metrics"] and "test/few" not in got["metrics"]  # NaN skipped
    assert got["tags"]["flow_run"] == "journal-test" and got["tags"]["dvc_stage"] == "teacher@tiny"
    assert got["tags"]["mlflow.source.name"] == sys.argv[0]
    assert got["artifacts"] == ["metrics.json", "plots/a.png", "plots/b.png", "tables/comparison.json"]

    # The times are the ones the stage recorded, not the replay's.
    run = client.get_run(run_id)
    assert run.info.start_time == records[0]["time"] and run.info.end_time == records[-1]["time"]
    recorded = [r["time"] for r in records if r["kind"] == "metrics"][:3]
    assert [m.timestamp for m in client.get_metric_history(run_id, "train/loss")] == recorded

    # The replayed model is the network itself: the same logits, from mlflow's pickle and from the project's files.
    net, _, example = model
    model_uri = f"models:/{run.outputs.model_outputs[0].model_id}"
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pytorch.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(example)), net(torch.from_numpy(example)))


def test_journal_without_close_ends_killed(store, tmp_path):
    import mlflow

    root, uri = store
    tr = JournalTracker(tmp_path, "student@x", "student-x", repo_root=root)
    tr.log_metrics({"train/loss": 1.0}, step=0)
    with open(tmp_path / "journal.jsonl", "a") as fh:
        fh.write('{"run": "cut sh')  # the process was killed while writing
    last = read_journal(tmp_path)[-1]["time"]
    run = mlflow.MlflowClient(uri).get_run(replay_journal(tmp_path))
    assert run.info.status == "KILLED" and run.info.end_time == last
    assert run.data.metrics == {"train/loss": 1.0}


def test_a_long_metric_history_is_replayed_whole_in_few_writes(store, tmp_path, monkeypatch):
    """1200 epochs of two metrics (one NaN, skipped): every step and timestamp arrives, in 2 log_batch calls of at
    most 1000 metrics, not 1200."""
    import mlflow

    root, uri = store
    tr = JournalTracker(tmp_path, "student@long", "student-long", repo_root=root)
    for epoch in range(1200):
        tr.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/few": math.nan}, step=epoch)
    tr.close()
    sizes: list[int] = []
    real = mlflow.MlflowClient.log_batch

    def counting(self, run_id, metrics=(), **kwargs):
        if metrics:
            sizes.append(len(metrics))
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", counting)
    written = {r["step"]: r["time"] for r in read_journal(tmp_path) if r["kind"] == "metrics"}
    run_id = replay_journal(tmp_path)
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1200))
    assert all(m.timestamp == written[m.step] for m in history)
    assert sizes == [1000, 200]


def test_a_record_that_fails_is_one_warning_and_the_journal_stays(store, tmp_path, caplog):
    import mlflow

    root, uri = store
    artifact = tmp_path / "gone.json"
    artifact.write_text("{}")
    journal = tmp_path / "journal"
    with JournalTracker(journal, "index@x", "index-x", repo_root=root) as tr:
        tr.log_artifact(artifact)
        tr.log_metrics({"test/all": 0.5})
        with pytest.raises(FileNotFoundError):  # as MLflowTracker would raise in the stage
            tr.log_artifact(tmp_path / "missing.json")
    artifact.unlink()
    run_id = replay_journal(journal)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "index@x" in warnings[0].getMessage() and "artifact" in warnings[0].getMessage()
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"test/all": 0.5}
    assert journal.is_dir()  # kept for a later look

    assert replay_journal(tmp_path / "nowhere") is None  # nothing to replay: no run, no error


def test_a_stage_that_journals_never_imports_mlflow(store, model, tmp_path):
    """create_tracker in a stage process with $LONGTAIL_TRACKING_JOURNAL: a journal, no mlflow or pandas import."""
    import mlflow

    root, uri = store
    _, model_dir, _ = model
    journal = tmp_path / "journal"
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from pipeline.tracking import JournalTracker, create_tracker
        with create_tracker("teacher@sub", "teacher-sub", {{"model": "sub"}}) as tr:
            assert isinstance(tr, JournalTracker), type(tr)
            tr.log_params({{"a": {{"b": 1}}}})
            tr.log_metrics({{"test/all": 0.25}}, step=2)
            tr.log_model(None, {str(model_dir)!r}, input_example=np.zeros((1, 3, 16, 16), np.float32), step=2)
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"mlflow", "pandas", "sqlalchemy"}}))
        """
    )
    env = {**os.environ, "LONGTAIL_TRACKING": "on", JOURNAL_ENV: str(journal), "DVC_ROOT": str(root),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (journal / "example-0.npy").is_file()
    run = mlflow.MlflowClient(uri).get_run(replay_journal(journal))
    assert run.data.params == {"a.b": "1"} and run.data.tags["model"] == "sub"
    assert [o.step for o in run.outputs.model_outputs] == [2]


def test_create_tracker_journals_only_when_asked(store, tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path))
    monkeypatch.setenv("LONGTAIL_TRACKING", "off")
    assert not isinstance(create_tracker("s", "s"), JournalTracker)  # off wins
    monkeypatch.setenv("LONGTAIL_TRACKING", "on")
    with create_tracker("s", "s", repo_root=store[0]) as tr:
        assert isinstance(tr, JournalTracker)
    assert read_journal(tmp_path)[0]["experiment"] == EXPERIMENT


def test_replayer_writes_each_journal_once_and_waits(store, tmp_path):
    """The runner side: a fresh journal per attempt, replayed in the background, all written when the block ends."""
    import mlflow

    from pipeline.orchestrate.journal_replay import JournalReplayer

    root, uri = store
    seen = []
    with JournalReplayer() as replayer:
        for attempt in range(2):  # a lock error, then the attempt that ran
            with replayer.attempt("evaluate") as journal:
                seen.append(journal)
                if attempt:
                    with JournalTracker(journal, "evaluate", "evaluate", repo_root=root) as tr:
                        tr.log_metrics({"all": 0.9})
    assert seen[0] != seen[1] and not any(os.path.exists(d) for d in seen)
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string="tags.stage = 'evaluate'",
    )
    assert [r.data.metrics for r in runs] == [{"all": 0.9}]
