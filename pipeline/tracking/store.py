"""Where the MLflow store lives and its one-time initialisation (mlflow is imported only to create a missing store).

Store: ``sqlite:///<absolute repo root>/mlflow.db`` (never a CWD-relative path: stages with another ``wdir`` would
create a second DB), artifacts under ``<repo>/mlartifacts``. ``MLFLOW_TRACKING_URI`` overrides the store. The DB is
created once by :func:`init_store` before any parallel work, because several processes opening a *fresh* SQLite
store at once race in alembic's migrations and corrupt it (ECOSYSTEM.md §4, mlflow ``_initialize_tables`` is
unlocked).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.tracking.base import EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

logger = logging.getLogger(__name__)


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
    """Cheap check (no mlflow import, ~1 ms) that the DB exists, is migrated and holds the experiment with its kind."""
    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)) as con:
            if con.execute("SELECT version_num FROM alembic_version").fetchone() is None:
                return False
            row = con.execute(
                "SELECT 1 FROM experiments e JOIN experiment_tags t ON t.experiment_id = e.experiment_id "
                "WHERE e.name = ? AND e.lifecycle_stage = 'active' AND t.key = ?",
                (experiment, EXPERIMENT_KIND_TAG),
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
    """Id of ``experiment``, created with its artifact location under ``<repo>/mlartifacts`` if missing.

    The experiment is tagged as model training (:data:`EXPERIMENT_KIND`); an existing one is tagged only when it has
    no kind yet, so a kind a user chose in the UI stays.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = f"{artifact_root(repo_root)}/{experiment}"
    return client.create_experiment(
        experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


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
