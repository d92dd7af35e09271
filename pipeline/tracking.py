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

The experiment carries ``mlflow.experimentKind = custom_model_development``, the tag the MLflow 3 UI writes when a
user picks "Machine learning" as the experiment's type (the 3.17.2 UI still opens an experiment in the view of its
sidebar switch "GenAI | Model training", default GenAI: ``?workflowType=machine_learning``, see docs/mlflow.md). A
training run holds, besides params and metrics, its model as an MLflow PyTorch model (:meth:`MLflowTracker.log_model`:
spec, weights, input example, signature), its plots and the dataset it was trained on as a run input
(:meth:`MLflowTracker.log_dataset`); the evaluate run holds the comparison as an MLflow table
(:meth:`MLflowTracker.log_table`). docs/mlflow.md shows what the UI gives from that.

Set ``LONGTAIL_TRACKING=off`` to get a :class:`NullTracker` (tests, quick runs).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import re
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable

# Telemetry must be off before mlflow is imported anywhere in this process (no network here; CI sets CI=1 anyway).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Never let model logging ask a package index about the model's requirements (``pip install --dry-run``): no network.
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
# Logging a model downloads it back from the local artifact store to validate its input example, drawing two
# "Downloading artifacts" progress bars per model into the stage log (mlflow's documented switch; a user's value wins).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

logger = logging.getLogger(__name__)

EXPERIMENT = "longtail-pipeline"
PARENT_RUN_ENV = "LONGTAIL_PARENT_RUN_ID"
# JSON object of tags every run gets, set by a flow run for its stages: {"flow_run": ..., "dvc_exp": ...}.
RUN_TAGS_ENV = "LONGTAIL_RUN_TAGS"
TRACKING_SWITCH_ENV = "LONGTAIL_TRACKING"
PARENT_TAG = "mlflow.parentRunId"  # = mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID
# What the MLflow 3 UI reads and writes (``setExperimentTag({key: "mlflow.experimentKind", value: kind})`` in its JS
# bundle; kinds ``genai_development`` and ``custom_model_development``, shown as "GenAI apps & agents" and "Machine
# learning"). No Python constant exists for it in mlflow 3.17.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Modules a pickled ``Network`` needs at load time besides the project itself (pinned to this environment).
_MODEL_REQUIREMENTS = ("torch", "timm", "numpy", "cloudpickle")
_FALLBACK_MAX_PARAM_LEN = 500  # mlflow < 2.x limit; the installed limit is read from mlflow when available
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")  # mlflow keys: alphanumerics, _ - . space / :

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
# mlflow.pytorch warns on every model saved with ``serialization_format="pickle"``, which ``MLflowTracker.log_model``
# chooses deliberately (see there; the project's own files never unpickle code): nothing a user can act on.
_PICKLE_WARNING = "Saving pytorch model by Pickle or CloudPickle format"


class _DropMessages(logging.Filter):
    """A logger filter that drops records whose message starts with one of ``prefixes`` (and nothing else)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _quiet_pickle_warning() -> None:
    """Drop mlflow's pickle-format warning (only that message) from the ``mlflow.pytorch`` logger, once."""
    log = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _DropMessages) for f in log.filters):
        log.addFilter(_DropMessages(_PICKLE_WARNING))


@runtime_checkable
class Tracker(Protocol):
    """What stages and the Trainer log to; one instance = one run."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_model(
        self,
        network: Any,
        model_dir: str | os.PathLike[str],
        *,
        input_example: Any = None,
        name: str | None = None,
        step: int | None = None,
    ) -> str | None: ...

    def log_dataset(
        self, table: Mapping[str, Sequence[Any]], *, name: str, digest: str, source: str, context: str = "train"
    ) -> None: ...

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None: ...

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

    def log_model(
        self,
        network: Any,
        model_dir: str | os.PathLike[str],
        *,
        input_example: Any = None,
        name: str | None = None,
        step: int | None = None,
    ) -> str | None:
        """Ignore a model; no URI."""
        return None

    def log_dataset(
        self, table: Mapping[str, Sequence[Any]], *, name: str, digest: str, source: str, context: str = "train"
    ) -> None:
        """Ignore a dataset input."""

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Ignore a table."""

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


def _model_name(name: str) -> str:
    """A LoggedModel name: mlflow refuses ``/ : . % " '`` in it (``teacher@r32`` stays, ``a/b.c`` → ``a-b_c``)."""
    return _clean_key(name).replace("/", "-").replace(":", "-").replace(".", "_") or "model"


def _json_safe(value: Any) -> Any:
    """A table cell as JSON takes it: NaN/Inf (an empty shot group) become None (``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pip_requirements() -> list[str]:
    """``name==version`` of :data:`_MODEL_REQUIREMENTS` as installed here (mlflow adds itself)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in _MODEL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            logger.debug("%s is not installed; left out of the model's requirements", name)
    return pins


@contextlib.contextmanager
def _pinned_requirements_check() -> Iterator[None]:
    """Make mlflow's check of the model's requirements against this environment cost milliseconds, not a second.

    ``warn_dependency_requirement_mismatches`` (run when a model is saved and again when its input example is
    validated) first maps every importable module to its distribution with ``importlib_metadata
    .packages_distributions()``: 0.4-1.3 s per process in this environment (249 distributions, 96 without
    ``top_level.txt``, so their file lists are read). The map only serves as a fallback for requirements whose
    distribution metadata is missing; ours are pinned from the installed distributions (:func:`_pip_requirements`),
    so an empty map gives the same answer through ``importlib_metadata.version``. It is restored afterwards, so
    requirement *inference* elsewhere in the process still sees the full map. Without that private module (another
    mlflow version) nothing changes but the time.
    """
    try:
        from mlflow.utils import requirements_utils as reqs
    except ImportError:  # pragma: no cover - depends on the mlflow version
        yield
        return
    if getattr(reqs, "_MODULES_TO_PACKAGES", ()) is not None:  # already built (or unknown layout): leave it
        yield
        return
    reqs._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        reqs._MODULES_TO_PACKAGES = None
        reqs._PACKAGES_TO_MODULES = None


def _on_cpu(network: Any) -> Any:
    """``network`` itself when all its tensors are on the CPU, else a CPU copy (a pickled CUDA model needs a GPU)."""
    tensors = [*network.parameters(), *network.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return network
    return copy.deepcopy(network).cpu()


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

        run_tags: dict[str, Any] = {"stage": stage, **run_tags_from_env()}
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
        self.run_name = run_name
        self.experiment_id = experiment_id
        self._model_tags = {k: str(v) for k, v in run_tags.items() if k != PARENT_TAG}
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

    def log_model(
        self,
        network: Any,
        model_dir: str | os.PathLike[str],
        *,
        input_example: Any = None,
        name: str | None = None,
        step: int | None = None,
    ) -> str | None:
        """Log a trained network as an MLflow PyTorch model of this run; return its ``models:/<id>`` URI.

        The model (MLflow 3 ``LoggedModel``, listed on the run's and the experiment's Models tab) holds the pickled
        module (``data/model.pth``, for ``mlflow.pytorch.load_model``), the project's own files ``model.json`` (spec)
        and ``model.pt`` (state_dict) under ``extra_files/`` (for ``pipeline.models.network.load_network``, which never
        unpickles code), the input example with the signature inferred from it, and requirements pinned to this
        environment (nothing is inferred or resolved over the network). Metrics of the run at ``step`` are linked to
        the model. Failing to log is a warning, not an error: the stage's outputs are already written.

        Args:
            network: the ``torch.nn.Module`` to log (a CPU copy is logged if it lives on a GPU).
            model_dir: directory with the network's ``model.json`` and ``model.pt`` (the stage's out).
            input_example: a small batch of preprocessed images, ``(B, C, H, W)`` float32 numpy.
            name: model name; default the run name.
            step: the step whose metrics describe the model (default 0).
        """
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        _quiet_pickle_warning()
        started = time.perf_counter()
        model_dir = Path(model_dir)
        extra_files = [str(model_dir / f) for f in ("model.json", "model.pt") if (model_dir / f).is_file()]
        name = _model_name(name or self.run_name)
        threads, training = torch.get_num_threads(), network.training
        net = network
        try:
            net = _on_cpu(network).eval()
            # The example's forward passes (ours for the signature, mlflow's serving check) are a few images: one
            # thread is 10-50x faster than two on a busy 2-core machine (tests/conftest.py measured the same).
            torch.set_num_threads(1)
            signature = None
            if input_example is not None:
                with torch.no_grad():
                    output = net(torch.as_tensor(input_example))
                signature = infer_signature(input_example, output.numpy())
            # Created here rather than inside ``log_model``: mlflow would put it in the fluent API's current
            # experiment (the Default one), not this run's.
            params = self._client.get_run(self.run_id).data.params
            model = self._client.create_logged_model(
                self.experiment_id, name=name, source_run_id=self.run_id, params=params, tags=self._model_tags
            )
            with _use_tracking_uri(self.tracking_uri), _pinned_requirements_check():
                info = mlflow.pytorch.log_model(
                    net,
                    name=name,
                    model_id=model.model_id,
                    run_id=self.run_id,
                    step=int(step or 0),
                    input_example=input_example,
                    signature=signature,
                    pip_requirements=_pip_requirements(),
                    extra_files=extra_files,
                    # "pt2" (mlflow 3's default, torch.export) takes 2-4 s per model here and loads back as a graph
                    # module without forward_features; pickle loads back the Network itself.
                    serialization_format="pickle",
                )
        except Exception as exc:  # noqa: BLE001 - a tracking copy must not fail a finished stage
            logger.warning("Could not log %s to MLflow (%s: %s); its files are in %s", name, type(exc).__name__,
                           exc, model_dir)
            return None
        finally:
            torch.set_num_threads(threads)
            net.train(training)
        logger.info("Logged model %s (%s) in %.2f s", name, info.model_uri, time.perf_counter() - started)
        return info.model_uri

    def log_dataset(
        self, table: Mapping[str, Sequence[Any]], *, name: str, digest: str, source: str, context: str = "train"
    ) -> None:
        """Record a dataset as an input of this run (the run page's and the runs table's "Dataset" column).

        Args:
            table: the dataset's description as columns, e.g. ``{"class": [...], "train_count": [...]}``; mlflow
                stores its schema and size, not the rows.
            name: dataset name.
            digest: content digest (at most 36 characters), e.g. of the dataset manifest.
            source: where the dataset lives (a path or URI).
            context: its role for the run (``train``, ``eval``).
        """
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # two equivalent local sources registered; int columns "cannot be NaN"
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
            dataset = mlflow.data.from_pandas(pd.DataFrame(dict(table)), source=source, name=name, digest=digest[:36])
            entity = dataset._to_mlflow_entity()  # what mlflow.log_input logs, without the fluent active run
        entry = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._client.log_inputs(self.run_id, datasets=[entry])

    def log_table(self, table: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Log columns as an MLflow table (``artifact_file`` ends in ``.json``; NaN becomes ``null``)."""
        clean = {str(k): [_json_safe(v) for v in col] for k, col in table.items()}
        self._client.log_table(self.run_id, clean, artifact_file)

    def close(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if self._closed:
            return
        valid = ("FINISHED", "FAILED", "KILLED")
        if status not in valid:
            raise ValueError(f"Unknown run status {status!r}; valid: {', '.join(valid)}")
        self._client.set_terminated(self.run_id, status=status)
        self._closed = True


def run_tags_from_env() -> dict[str, str]:
    """The tags in ``$LONGTAIL_RUN_TAGS`` (a JSON object; a flow run sets it for its stages), else ``{}``."""
    text = os.environ.get(RUN_TAGS_ENV, "").strip()
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except json.JSONDecodeError:
        logger.warning("Ignoring %s: not a JSON object: %r", RUN_TAGS_ENV, text[:200])
        return {}
    if not isinstance(tags, dict):
        logger.warning("Ignoring %s: not a JSON object: %r", RUN_TAGS_ENV, text[:200])
        return {}
    return {str(k): str(v) for k, v in tags.items()}


def write_timings(path: str | os.PathLike[str] | None, timings: Mapping[str, Any]) -> None:
    """Write a stage execution's wall times as JSON to ``path`` (None: nowhere), atomically.

    Timings differ on every run, so they never go into a DVC output: there they would change its hash on an
    identical rerun and rerun everything downstream. The stage CLIs write ``data/timings/<stage>.json``
    (``stages._cli.timings_path``), which no stage reads and DVC does not track; the same numbers go to the MLflow run.
    """
    if path is None:
        return
    from pipeline.io import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(timings))


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
