"""A stage's MLflow run written as a journal by the stage process and replayed into MLflow by the runner.

Importing mlflow and opening its SQLite store costs a stage process about 2.3 s of CPU before its first training
step (``import mlflow`` ~1.3 s; ``MlflowClient`` → the SqlAlchemy store and its ORM mappers ~1.1 s), and logging
another ~0.3 s at the end. When a runner drives the stages (:mod:`pipeline.orchestrate.journal_replay`) it sets
``$LONGTAIL_TRACKING_JOURNAL`` to a fresh directory per stage execution; :func:`pipeline.tracking.create_tracker` then
returns a :class:`JournalTracker`, which imports neither mlflow nor pandas and appends one JSON line per call to
``<dir>/journal.jsonl``. After the stage process ended, :func:`replay_journal` writes the same calls into MLflow through
:class:`~pipeline.tracking.mlflow_run.MLflowTracker`, in the runner process, with the times the stage recorded.

What the stage process alone knows is recorded when it happens: the run's tags (``$LONGTAIL_RUN_TAGS``,
``$DVC_STAGE``, the git commit, the parent run), the store and repository root, ``sys.argv[0]`` (mlflow's source
name and the file its git tags are read from), every timestamp. mlflow's user tag and ``$MLFLOW_RUN_CONTEXT`` are
resolved at replay, in the runner, which runs as the same user with the environment the stage inherited. A replayed
run therefore equals a direct one, but for:

* the ids mlflow makes (run id, logged-model id) and the times mlflow itself stamps (the logged model's creation time,
  ``utc_time_created`` in its ``MLmodel``);
* the logged model is rebuilt from the files the stage wrote (``load_network(model_dir)``: ``model.json`` and
  ``model.pt``) rather than pickled from the live module: the same weights and buffers, and a ``spec`` without the
  backbone's ``pretrained``/``checkpoint_file`` (which ``load_network`` drops, so no weights are fetched again);
  :meth:`JournalTracker.log_model` returns None (the model's URI exists only after the replay);
* artifact files are copied when the journal is replayed, not when they were logged (a stage logs finished outputs);
* mlflow's ``mlflow.source.git.*`` tags are read at replay from the stage's script (same checkout: they differ only
  if its HEAD moved in between; the project's own ``git_commit`` tag is recorded by the stage);
* a stage process that dies without closing its run (SIGKILL) leaves a run that ends KILLED, at the time of its last
  record, rather than one left RUNNING.

Record kinds (each with ``run``, a key per tracker, and ``time``, Unix ms): ``start``, ``params``, ``metrics``,
``artifact``, ``tags``, ``dataset``, ``table``, ``model`` (input example saved as ``example-<n>.npy`` next to the
journal) and ``close``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.base import (
    EXPERIMENT,
    RunStatus,
    _ContextMixin,
    check_status,
    flatten_params,
    stage_run_tags,
)
from pipeline.tracking.store import default_tracking_uri, find_repo_root

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _plain(value: Any) -> Any:
    """``json.dumps`` fallback: numpy/torch scalars and arrays as Python numbers and lists, paths as strings."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def journal_has_records(journal_dir: str | os.PathLike[str]) -> bool:
    """Whether a stage wrote anything into ``journal_dir`` (a stage that was skipped or never started did not)."""
    path = Path(journal_dir) / JOURNAL_FILE
    return path.is_file() and path.stat().st_size > 0


# --------------------------------------------------------------------------------------------------------------------
# Writing (in the stage process)
# --------------------------------------------------------------------------------------------------------------------
class JournalTracker(_ContextMixin):
    """A :class:`~pipeline.tracking.base.Tracker` that appends its calls to ``<journal_dir>/journal.jsonl``.

    Arguments as :class:`~pipeline.tracking.mlflow_run.MLflowTracker`'s, resolved here as that class resolves them
    (repository root, store, tags) so that the replay, in another process, writes the run this process would have.
    Inputs are copied when a call is made (params flattened and turned into strings, metrics into floats), so later
    changes to them do not reach the run. ``run_id`` is None: the run exists only after the replay.
    """

    run_id: str | None = None

    def __init__(
        self,
        journal_dir: str | os.PathLike[str],
        stage: str,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        experiment: str = EXPERIMENT,
        tracking_uri: str | None = None,
        *,
        repo_root: str | os.PathLike[str] | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.dir = Path(journal_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.repo_root = Path(repo_root).resolve() if repo_root is not None else find_repo_root()
        self.run_name = run_name
        self._key = uuid.uuid4().hex[:12]
        self._closed = False
        self._file = open(self.dir / JOURNAL_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        # What mlflow's DefaultRunContext and GitRunContext read: sys.argv[0] (``python -m stages.x`` gives the
        # module's absolute path), and the same path made absolute against this process's working directory.
        argv0 = sys.argv[0] if sys.argv and sys.argv[0] else None
        self._write(
            "start",
            stage=stage,
            run_name=run_name,
            experiment=experiment,
            tracking_uri=tracking_uri or default_tracking_uri(self.repo_root),
            repo_root=os.fspath(self.repo_root),
            run_tags=stage_run_tags(stage, tags, self.repo_root, parent_run_id),
            source_name=argv0 or "<console>",
            main_file=os.path.abspath(argv0) if argv0 and os.path.isfile(argv0) else None,
        )
        logger.info("MLflow run %s journaled in %s (replayed by the runner)", run_name, self.dir)

    def _write(self, kind: str, **fields: Any) -> None:
        record = {"run": self._key, "kind": kind, "time": _now_ms(), **fields}
        self._file.write(json.dumps(record, default=_plain) + "\n")
        self._file.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record params, flattened with dots and as strings (what MLflowTracker logs of them)."""
        flat = {k: str(v) for k, v in flatten_params(params).items()}
        if flat:
            self._write("params", params=flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics at ``step`` and now (NaN values are kept here and skipped by the replay)."""
        values = {str(k): float(v) for k, v in metrics.items()}
        if values:
            self._write("metrics", metrics=values, step=int(step or 0))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Record a file or directory by its absolute path (copied at replay); a missing one raises now, as it would."""
        absolute = os.path.abspath(path)  # not resolve(): a DVC out may be a link into the cache, named by its hash
        if not os.path.exists(absolute):
            raise FileNotFoundError(f"No such file or directory to log as an MLflow artifact: {absolute}")
        self._write("artifact", path=absolute, artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Record tags (as strings)."""
        values = {str(k): str(v) for k, v in tags.items()}
        if values:
            self._write("tags", tags=values)

    def log_model(
        self,
        network: Any,
        model_dir: str | os.PathLike[str],
        *,
        input_example: Any = None,
        name: str | None = None,
        step: int | None = None,
    ) -> str | None:
        """Record a model by its directory (``model.json`` and ``model.pt``, rebuilt at replay) and input example.

        ``network`` itself is not kept: the replay rebuilds it with ``pipeline.models.network.load_network``. A
        directory without those files is a warning, like a model MLflowTracker fails to log. Returns None.
        """
        model_dir = Path(model_dir).absolute()
        missing = [f for f in ("model.json", "model.pt") if not (model_dir / f).is_file()]
        if missing:
            logger.warning("Could not journal the model of %s: %s has no %s (pipeline.models.network.save_network)",
                           self.run_name, model_dir, " or ".join(missing))
            return None
        example = None
        if input_example is not None:
            import numpy as np

            if hasattr(input_example, "detach"):  # a torch tensor
                input_example = input_example.detach().cpu().numpy()
            example = self._new_example_path()
            with open(example, "wb") as fh:
                np.save(fh, np.asarray(input_example), allow_pickle=False)
        self._write("model", model_dir=os.fspath(model_dir), name=name, step=int(step or 0),
                    example=example.name if example is not None else None)
        return None

    def _new_example_path(self) -> Path:
        """``<dir>/example-<n>.npy`` with the first free ``n`` (created, so two trackers never share one)."""
        n = 0
        while True:
            path = self.dir / f"example-{n}.npy"
            try:
                path.open("xb").close()
            except FileExistsError:
                n += 1
                continue
            return path

    def log_dataset(
        self, table: Mapping[str, Sequence[Any]], *, name: str, digest: str, source: str, context: str = "train"
    ) -> None:
        """Record a dataset input: its columns (a copy), name, digest, source and context."""
        self._write("dataset", table={str(k): list(v) for k, v in table.items()}, name=name, digest=digest,
                    source=str(source), context=context)

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Record an MLflow table (a copy of its columns)."""
        self._write("table", table={str(k): list(v) for k, v in table.items()}, artifact_file=artifact_file)

    def close(self, status: RunStatus = "FINISHED") -> None:
        """Record the run's end with ``status`` and close the journal; later calls do nothing."""
        if self._closed:
            return
        check_status(status)
        self._write("close", status=status)
        self._file.close()
        self._closed = True


# --------------------------------------------------------------------------------------------------------------------
# Replaying (in the runner process)
# --------------------------------------------------------------------------------------------------------------------
def read_journal(journal_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``<journal_dir>/journal.jsonl`` in order; a last line cut short (the writer was killed) is
    dropped."""
    path = Path(journal_dir) / JOURNAL_FILE
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            logger.debug("Dropping the truncated last record of %s", path)
    return records


def _context_tags(start: Mapping[str, Any]) -> dict[str, str]:
    """mlflow's system tags for the run recorded by ``start``, as mlflow would resolve them in the stage process.

    The registry's providers run here except the git and notebook ones; the source name is the stage's
    ``sys.argv[0]`` and the git tags are read from the file it names, as mlflow's ``GitRunContext`` does (whose
    answer is cached per process, so it cannot be asked about another process's file).
    """
    from mlflow.tracking.context.git_context import GitRunContext
    from mlflow.tracking.context.jupyter_notebook_context import JupyterNotebookRunContext
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    tags = resolve_tags(ignore=[GitRunContext, JupyterNotebookRunContext])
    tags[MLFLOW_SOURCE_NAME] = start["source_name"]
    tags[MLFLOW_SOURCE_TYPE] = "LOCAL"  # a stage is a script (DefaultRunContext), never a notebook
    main = start.get("main_file")
    commit = git_utils.get_git_commit(main) if main else None
    if commit is not None:  # GitRunContext.in_context
        git = {
            MLFLOW_GIT_COMMIT: commit,
            MLFLOW_GIT_BRANCH: git_utils.get_git_branch(main),
            MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(main),
        }
        tags.update({k: v for k, v in git.items() if v is not None})
    return tags


def _replay_record(tracker: Any, record: Mapping[str, Any], journal_dir: Path) -> None:
    """Apply one non-start record to its run's MLflowTracker."""
    kind = record["kind"]
    if kind == "params":
        tracker.log_params(record["params"])
    elif kind == "metrics":
        tracker.log_metrics(record["metrics"], step=record["step"], timestamp=record["time"])
    elif kind == "metric_rows":  # consecutive metrics records of one run (_coalesce_metrics)
        tracker.log_metric_rows([(r["metrics"], r["step"], r["time"]) for r in record["rows"]])
    elif kind == "artifact":
        tracker.log_artifact(record["path"], record["artifact_path"])
    elif kind == "tags":
        tracker.set_tags(record["tags"])
    elif kind == "dataset":
        tracker.log_dataset(record["table"], name=record["name"], digest=record["digest"], source=record["source"],
                            context=record["context"])
    elif kind == "table":
        tracker.log_table(record["table"], record["artifact_file"])
    elif kind == "model":
        import numpy as np

        from pipeline.models.network import load_network

        example = np.load(journal_dir / record["example"]) if record.get("example") else None
        network = load_network(record["model_dir"])
        if tracker.log_model(network, record["model_dir"], input_example=example, name=record.get("name"),
                             step=record["step"]) is None:
            raise RuntimeError(f"the model in {record['model_dir']} was not logged (see the warning above)")
    elif kind == "close":
        tracker.close(record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown journal record kind {kind!r}")


def replay_journal(journal_dir: str | os.PathLike[str]) -> str | None:
    """Write the run(s) journaled in ``journal_dir`` into MLflow; delete the journal when every record was written.

    Each run gets the start, metric and end times its stage recorded; a run without a ``close`` record (its process
    was killed) ends KILLED at the time of its last record. A record that cannot be written is skipped and the others
    are written; the failures are logged as one warning that names the stage, and the journal is then kept. Nothing
    is raised.

    Returns:
        The id of the (first) run, or None when none was created.
    """
    journal_dir = Path(journal_dir)
    stage = "?"
    try:
        records = read_journal(journal_dir)
        if not records:
            return None
        stage = next((r["stage"] for r in records if r["kind"] == "start"), stage)
        run_ids, errors = _replay(records, journal_dir)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the pipeline
        logger.warning("Could not replay the MLflow run of stage %s from %s (%s: %s)", stage, journal_dir,
                       type(exc).__name__, exc)
        return None
    if errors:
        logger.warning("MLflow run of stage %s replayed from %s without %d record(s): %s; the journal is kept",
                       stage, journal_dir, len(errors), "; ".join(errors[:5]))
    else:
        shutil.rmtree(journal_dir, ignore_errors=True)
    return run_ids[0] if run_ids else None


def _coalesce_metrics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive ``metrics`` records of one run as one ``metric_rows`` record (written in batches: a 300-epoch
    history took 9 s as 300 writes); every other record, and the order, as they are."""
    out: list[dict[str, Any]] = []
    for record in records:
        if record.get("kind") == "metrics":
            last = out[-1] if out else None
            if last is not None and last.get("kind") == "metric_rows" and last.get("run") == record.get("run"):
                last["rows"].append(record)
                last["time"] = record.get("time", last["time"])
                continue
            out.append({"run": record.get("run", ""), "kind": "metric_rows", "time": record.get("time", 0),
                        "rows": [record]})
        else:
            out.append(record)
    return out


def _replay(records: list[dict[str, Any]], journal_dir: Path) -> tuple[list[str], list[str]]:
    """Replay ``records`` (several runs in one journal are kept apart by their ``run`` key); (run ids, failures)."""
    from pipeline.tracking.mlflow_run import MLflowTracker

    trackers: dict[str, MLflowTracker | None] = {}
    last_time: dict[str, int] = {}
    run_ids: list[str] = []
    errors: list[str] = []
    for record in _coalesce_metrics(records):
        key, kind = record.get("run", ""), record.get("kind")
        last_time[key] = max(last_time.get(key, 0), int(record.get("time", 0)))
        try:
            if kind == "start":
                tracker = MLflowTracker(
                    record["stage"],
                    record["run_name"],
                    experiment=record["experiment"],
                    tracking_uri=record["tracking_uri"],
                    repo_root=record["repo_root"],
                    start_time=record["time"],
                    run_tags=record["run_tags"],
                    context_tags=_context_tags(record),
                )
                trackers[key] = tracker
                run_ids.append(str(tracker.run_id))
                continue
            if key not in trackers:
                trackers[key] = None  # reported once, not once per record
                raise RuntimeError("its run has no start record")
            tracker = trackers[key]
            if tracker is not None:  # else its start failed, and was reported
                _replay_record(tracker, record, journal_dir)
        except Exception as exc:  # noqa: BLE001 - the other records still go in
            if kind == "start":
                trackers[key] = None
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    for key, tracker in trackers.items():
        if tracker is not None and not tracker._closed:
            try:
                tracker.close("KILLED", end_time=last_time.get(key) or None)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"close: {type(exc).__name__}: {exc}")
    return run_ids, errors

