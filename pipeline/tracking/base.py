"""The ``Tracker`` interface, the no-op tracker, the environment switches and what every tracker computes alike.

Nothing here imports mlflow: a stage that journals its run (:mod:`pipeline.tracking.journal`) or does not track at
all pays for none of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
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
# A directory: the stage writes its run there as a journal (pipeline.tracking.journal) instead of opening MLflow; the
# runner that set it replays the journal into MLflow after the stage process ended.
JOURNAL_ENV = "LONGTAIL_TRACKING_JOURNAL"
PARENT_TAG = "mlflow.parentRunId"  # = mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID
# What the MLflow 3 UI reads and writes (``setExperimentTag({key: "mlflow.experimentKind", value: kind})`` in its JS
# bundle; kinds ``genai_development`` and ``custom_model_development``, shown as "GenAI apps & agents" and "Machine
# learning"). No Python constant exists for it in mlflow 3.17.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
RUN_STATUSES: tuple[RunStatus, ...] = ("FINISHED", "FAILED", "KILLED")
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")  # mlflow keys: alphanumerics, _ - . space / :


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


def check_status(status: str) -> RunStatus:
    """``status`` if it is a run status MLflow ends a run with, else a ValueError naming the valid ones."""
    if status not in RUN_STATUSES:
        raise ValueError(f"Unknown run status {status!r}; valid: {', '.join(RUN_STATUSES)}")
    return status  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Environment switches and the tags of a stage's run
# --------------------------------------------------------------------------------------------------------------------
def tracking_enabled() -> bool:
    """False when ``$LONGTAIL_TRACKING`` is ``off`` (or 0/false/no)."""
    return os.environ.get(TRACKING_SWITCH_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}


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


def stage_run_tags(
    stage: str, tags: Mapping[str, Any] | None, repo_root: Path, parent_run_id: str | None = None
) -> dict[str, str]:
    """The tags of a stage's run, as the stage process sees them (its environment and its checkout).

    ``stage``, the flow's ``$LONGTAIL_RUN_TAGS``, ``dvc_stage`` (``$DVC_STAGE``, set by ``dvc repro``), ``git_commit``,
    then ``tags``, and ``mlflow.parentRunId`` from ``parent_run_id`` (default ``$LONGTAIL_PARENT_RUN_ID``; ``""``: no
    parent). mlflow's own system tags (user, source) are not among them: MLflow resolves those when it creates the run.
    """
    run_tags: dict[str, Any] = {"stage": stage, **run_tags_from_env()}
    if os.environ.get("DVC_STAGE"):
        run_tags["dvc_stage"] = os.environ["DVC_STAGE"]
    commit = _git_commit(repo_root)
    if commit:
        run_tags["git_commit"] = commit
    run_tags.update(tags or {})
    parent = parent_run_id if parent_run_id is not None else os.environ.get(PARENT_RUN_ENV) or None
    if parent:
        run_tags[PARENT_TAG] = parent
    return {k: str(v) for k, v in run_tags.items()}


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


# --------------------------------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------------------------------
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


def _json_safe(value: Any) -> Any:
    """A table cell as JSON takes it: NaN/Inf (an empty shot group) become None (``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
