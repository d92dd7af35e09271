"""Experiment tracking behind a small ``Tracker`` interface (the only module that imports mlflow).

One MLflow run per stage execution: params (nested dicts flattened with dots), per-epoch metrics, final metrics and
artifacts, tagged with the stage, model, dataset and git commit. When the Prefect flow launches the pipeline it
creates a parent run and hands its id to every stage process through ``LONGTAIL_PARENT_RUN_ID``; each stage run then
carries the tag ``mlflow.parentRunId`` (what ``mlflow.start_run(parent_run_id=...)`` writes), so the MLflow UI nests
stage runs under the pipeline run (ECOSYSTEM.md §4: a parent created in one process and a child in another works).

Store: ``sqlite:///<absolute repo root>/mlflow.db`` (never a CWD-relative path: stages with another ``wdir`` would
create a second DB), artifacts under ``<repo>/mlartifacts``. ``MLFLOW_TRACKING_URI`` overrides the store. The DB is
created once by :func:`init_store` before any parallel work, because several processes opening a *fresh* SQLite
store at once race in alembic's migrations and corrupt it (ECOSYSTEM.md §4, mlflow ``_initialize_tables`` is
unlocked). Telemetry is switched off before mlflow is imported.

We use ``MlflowClient`` with explicit run ids instead of the fluent API, whose active-run stack is thread-local
global state; the system tags the fluent ``start_run`` would add are resolved with mlflow's tag-context registry.

Set ``LONGTAIL_TRACKING=off`` to get a :class:`NullTracker` (tests, quick runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable

# Telemetry must be off before mlflow is imported anywhere in this process (no network here; CI sets CI=1 anyway).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

logger = logging.getLogger(__name__)

EXPERIMENT = "longtail-pipeline"
PARENT_RUN_ENV = "LONGTAIL_PARENT_RUN_ID"
TRACKING_SWITCH_ENV = "LONGTAIL_TRACKING"
PARENT_TAG = "mlflow.parentRunId"  # = mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID
_FALLBACK_MAX_PARAM_LEN = 500  # mlflow < 2.x limit; the installed limit is read from mlflow when available
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")  # mlflow keys: alphanumerics, _ - . space / :

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


@runtime_checkable
class Tracker(Protocol):
    """What stages and the Trainer log to; one instance = one run."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def close(self, status: RunStatus = "FINISHED") -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None): ...


class _ContextMixin:
    """Context-manager support: the run ends FINISHED, or FAILED when the block raised."""

    def close(self, status: RunStatus = "FINISHED") -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))
        return False


class NullTracker(_ContextMixin):
    """A tracker that records nothing (tests, ``LONGTAIL_TRACKING=off``)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Ignore params."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Ignore metrics."""

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Ignore an artifact."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Ignore tags."""

    def close(self, status: RunStatus = "FINISHED") -> None:
        """Nothing to close."""


# --------------------------------------------------------------------------------------------------------------------
# Store location and initialisation
# --------------------------------------------------------------------------------------------------------------------
def find_repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The DVC repository root: ``$DVC_ROOT`` (set by ``dvc repro`` for stage commands), else the nearest parent of
    ``start`` (default: the CWD) holding ``.dvc/``, else ``start`` itself."""
    if start is None and os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return here


def default_tracking_uri(repo_root: str | os.PathLike[str]) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute repo root>/mlflow.db``.

    The path is absolute so that every stage, whatever its ``wdir``, writes to the same store.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"


def artifact_root(repo_root: str | os.PathLike[str]) -> str:
    """``file://`` URI of ``<repo>/mlartifacts``, the artifact location of the experiments this project creates."""
    return (Path(repo_root).resolve() / "mlartifacts").as_uri()


def _sqlite_path(uri: str) -> Path | None:
    """The DB file of a ``sqlite:///`` URI, or None for another kind of store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def _experiment_in_db(db: Path, experiment: str) -> bool:
    """Cheap check (no mlflow import, ~1 ms) that the DB exists, is migrated and holds the experiment."""
    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)) as con:
            if con.execute("SELECT version_num FROM alembic_version").fetchone() is None:
                return False
            row = con.execute(
                "SELECT 1 FROM experiments WHERE name = ? AND lifecycle_stage = 'active'", (experiment,)
            ).fetchone()
            return row is not None
    except sqlite3.Error:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ensure_experiment(client: Any, experiment: str, repo_root: Path) -> str:
    """Id of ``experiment``, created with its artifact location under ``<repo>/mlartifacts`` if missing."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = f"{artifact_root(repo_root)}/{experiment}"
    return client.create_experiment(experiment, artifact_location=location)


def init_store(repo_root: str | os.PathLike[str], experiment: str = EXPERIMENT, tracking_uri: str | None = None) -> str:
    """Create the tracking DB (all migrations) and the experiment, once, before any parallel work.

    Idempotent; takes about a millisecond when both exist (a read-only SQLite query, no mlflow import). Concurrent
    callers are serialised by a ``flock`` next to the DB, so two ``make run`` started together cannot race either.

    Args:
        repo_root: the DVC repository root.
        experiment: experiment to create.
        tracking_uri: store URI; default :func:`default_tracking_uri`.

    Returns:
        The tracking URI that was initialised.
    """
    root = Path(repo_root).resolve()
    uri = tracking_uri or default_tracking_uri(root)
    db = _sqlite_path(uri)
    if db is not None and _experiment_in_db(db, experiment):
        return uri
    started = time.perf_counter()
    lock = (db.parent / f"{db.name}-init.lock") if db is not None else root / "mlflow.db-init.lock"
    with _file_lock(lock):
        if db is not None and _experiment_in_db(db, experiment):  # another process finished first
            return uri
        from mlflow.tracking import MlflowClient

        # Opening the store creates the tables and runs every alembic migration (``mlflow db upgrade`` equivalent).
        client = MlflowClient(tracking_uri=uri)
        _ensure_experiment(client, experiment, root)
    logger.info("Initialised MLflow store %s (experiment %r) in %.1f s", uri, experiment, time.perf_counter() - started)
    return uri


# --------------------------------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------------------------------
def _max_param_len() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except ImportError:  # pragma: no cover - depends on the mlflow version
        return _FALLBACK_MAX_PARAM_LEN


def _clean_key(key: str) -> str:
    """Replace characters mlflow rejects in param/metric keys (e.g. ``acc@1`` → ``acc_1``)."""
    return _KEY_BAD_CHARS.sub("_", key)[:250]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings with dots: ``{'a': {'b': 1}}`` → ``{'a.b': 1}``. Lists and scalars stay values."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                flat.update(flatten_params(value, name))
            else:
                flat[name] = "{}"
        else:
            flat[name] = value
    return flat


def _param_value(value: Any, limit: int) -> str:
    """String form of a param value, truncated to mlflow's length limit with a visible ``...`` marker."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _git_commit(cwd: Path) -> str | None:
    """``git rev-parse HEAD`` in ``cwd``, or None outside a git repo / before the first commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------------------------------------------------
# MLflow tracker
# --------------------------------------------------------------------------------------------------------------------
class MLflowTracker(_ContextMixin):
    """One MLflow run (per stage execution), created on construction and ended by :meth:`close`.

    Args:
        stage: stage name (``teacher@r32``), tagged as ``stage``.
        run_name: run name shown in the UI.
        tags: extra tags, e.g. ``{'model': 'r32', 'dataset': 'digits_lt'}``.
        experiment: experiment name (created if missing).
        tracking_uri: store URI; default :func:`default_tracking_uri` of the repo root.
        repo_root: repository root; default :func:`find_repo_root`.
        parent_run_id: parent run; default ``$LONGTAIL_PARENT_RUN_ID`` (set by the Prefect flow).
    """

    def __init__(
        self,
        stage: str,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        experiment: str = EXPERIMENT,
        tracking_uri: str | None = None,
        *,
        repo_root: str | os.PathLike[str] | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        self.repo_root = Path(repo_root).resolve() if repo_root is not None else find_repo_root()
        self.tracking_uri = init_store(self.repo_root, experiment, tracking_uri)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._max_param_len = _max_param_len()
        experiment_id = _ensure_experiment(self._client, experiment, self.repo_root)

        run_tags: dict[str, Any] = {"stage": stage}
        if os.environ.get("DVC_STAGE"):
            run_tags["dvc_stage"] = os.environ["DVC_STAGE"]
        commit = _git_commit(self.repo_root)
        if commit:
            run_tags["git_commit"] = commit
        run_tags.update(tags or {})
        parent = parent_run_id if parent_run_id is not None else os.environ.get(PARENT_RUN_ENV) or None
        if parent:
            run_tags[PARENT_TAG] = parent
        # Same system tags (user, source name, git commit) that the fluent ``mlflow.start_run`` resolves.
        resolved = resolve_tags({k: str(v) for k, v in run_tags.items()})
        run = self._client.create_run(experiment_id, run_name=run_name, tags=resolved)
        self.run_id: str | None = run.info.run_id
        self.experiment_id = experiment_id
        self._closed = False
        logger.info(
            "MLflow run %s (%s) in %s%s",
            run_name,
            self.run_id,
            self.tracking_uri,
            f", child of {parent}" if parent else "",
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; nested mappings are flattened with dots, values truncated to mlflow's length limit."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        entries = [Param(_clean_key(k), _param_value(v, self._max_param_len)) for k, v in flat.items()]
        if entries:
            self._client.log_batch(self.run_id, params=entries)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (default 0); NaN values are skipped (an empty shot group is NaN)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            value = float(value)
            if math.isnan(value):
                logger.debug("Skipping NaN metric %s", key)
                continue
            entries.append(Metric(_clean_key(key), value, now, int(step or 0)))
        if entries:
            self._client.log_batch(self.run_id, metrics=entries)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a file (or a directory's files) into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags."""
        from mlflow.entities import RunTag

        entries = [RunTag(_clean_key(str(k)), _param_value(v, 8000)) for k, v in tags.items()]
        if entries:
            self._client.log_batch(self.run_id, tags=entries)

    def close(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if self._closed:
            return
        valid = ("FINISHED", "FAILED", "KILLED")
        if status not in valid:
            raise ValueError(f"Unknown run status {status!r}; valid: {', '.join(valid)}")
        self._client.set_terminated(self.run_id, status=status)
        self._closed = True


def tracking_enabled() -> bool:
    """False when ``$LONGTAIL_TRACKING`` is ``off`` (or 0/false/no)."""
    return os.environ.get(TRACKING_SWITCH_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}


def create_tracker(stage: str, name: str, tags: Mapping[str, Any] | None = None, **kwargs: Any) -> Tracker:
    """The tracker a stage should use: :class:`NullTracker` when ``LONGTAIL_TRACKING=off``, else an MLflow run.

    Args:
        stage: stage name, e.g. ``teacher@r32``.
        name: run name.
        tags: extra tags (model, dataset, ...).
        **kwargs: forwarded to :class:`MLflowTracker` (experiment, tracking_uri, repo_root, parent_run_id).
    """
    if not tracking_enabled():
        return NullTracker()
    return MLflowTracker(stage, name, tags, **kwargs)
