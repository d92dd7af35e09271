"""Experiment tracking behind a small ``Tracker`` interface (the only package that imports mlflow).

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

When a runner drives the stages (``python -m pipeline.orchestrate run``, the Prefect flow's local executor), it sets
``LONGTAIL_TRACKING_JOURNAL`` and a stage writes its run as a journal instead (:class:`JournalTracker`, no mlflow
import in the stage process); the runner replays it into MLflow (:func:`replay_journal`) after the stage ended.

The experiment carries ``mlflow.experimentKind = custom_model_development``, the tag the MLflow 3 UI writes when a
user picks "Machine learning" as the experiment's type (the 3.17.2 UI still opens an experiment in the view of its
sidebar switch "GenAI | Model training", default GenAI: ``?workflowType=machine_learning``, see docs/mlflow.md). A
training run holds, besides params and metrics, its model as an MLflow PyTorch model (:meth:`MLflowTracker.log_model`:
spec, weights, input example, signature), its plots and the dataset it was trained on as a run input
(:meth:`MLflowTracker.log_dataset`); the evaluate run holds the comparison as an MLflow table
(:meth:`MLflowTracker.log_table`). docs/mlflow.md shows what the UI gives from that.

Set ``LONGTAIL_TRACKING=off`` to get a :class:`NullTracker` (tests, quick runs).

Modules: :mod:`~pipeline.tracking.base` (the interface, :class:`NullTracker`, switches, tags),
:mod:`~pipeline.tracking.store` (store location and initialisation), :mod:`~pipeline.tracking.mlflow_run`
(:class:`MLflowTracker`), :mod:`~pipeline.tracking.models` (model-logging helpers), :mod:`~pipeline.tracking.journal`
(journal and replay).
Importing this package imports no mlflow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pipeline.tracking.base import (
    EXPERIMENT,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    JOURNAL_ENV,
    PARENT_RUN_ENV,
    PARENT_TAG,
    RUN_TAGS_ENV,
    TRACKING_SWITCH_ENV,
    NullTracker,
    RunStatus,
    Tracker,
    flatten_params,
    run_tags_from_env,
    stage_run_tags,
    tracking_enabled,
    write_timings,
)
from pipeline.tracking.journal import JournalTracker, journal_has_records, read_journal, replay_journal
from pipeline.tracking.mlflow_run import MLflowTracker
from pipeline.tracking.store import artifact_root, default_tracking_uri, find_repo_root, init_store

__all__ = [
    "EXPERIMENT",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "JOURNAL_ENV",
    "PARENT_RUN_ENV",
    "PARENT_TAG",
    "RUN_TAGS_ENV",
    "TRACKING_SWITCH_ENV",
    "JournalTracker",
    "MLflowTracker",
    "NullTracker",
    "RunStatus",
    "Tracker",
    "artifact_root",
    "create_tracker",
    "default_tracking_uri",
    "find_repo_root",
    "flatten_params",
    "init_store",
    "journal_has_records",
    "read_journal",
    "replay_journal",
    "run_tags_from_env",
    "stage_run_tags",
    "tracking_enabled",
    "write_timings",
]


def create_tracker(stage: str, name: str, tags: Mapping[str, Any] | None = None, **kwargs: Any) -> Tracker:
    """The tracker a stage should use: :class:`NullTracker` when ``LONGTAIL_TRACKING=off``; a :class:`JournalTracker`
    when ``$LONGTAIL_TRACKING_JOURNAL`` names a directory (a runner replays it); else an MLflow run.

    Args:
        stage: stage name, e.g. ``teacher@r32``.
        name: run name.
        tags: extra tags (model, dataset, ...).
        **kwargs: forwarded to :class:`MLflowTracker` (experiment, tracking_uri, repo_root, parent_run_id).
    """
    if not tracking_enabled():
        return NullTracker()
    journal = os.environ.get(JOURNAL_ENV, "").strip()
    if journal:
        return JournalTracker(journal, stage, name, tags, **kwargs)
    return MLflowTracker(stage, name, tags, **kwargs)
