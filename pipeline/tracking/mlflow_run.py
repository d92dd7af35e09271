"""One MLflow run per stage execution, written through ``MlflowClient`` (mlflow imported when a run is opened).

Params (nested dicts flattened with dots), per-epoch metrics, final metrics and artifacts, tagged with the stage,
model, dataset and git commit (:func:`pipeline.tracking.base.stage_run_tags`). We use ``MlflowClient`` with explicit
run ids instead of the fluent API, whose active-run stack is thread-local global state; the system tags the fluent
``start_run`` would add are resolved with mlflow's tag-context registry.

The optional ``start_time``/``timestamp``/``end_time`` arguments and ``run_tags``/``context_tags`` let a journal
replay (:func:`pipeline.tracking.journal.replay_journal`) write a run recorded in another process with the times and
tags that process saw.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.base import (
    EXPERIMENT,
    PARENT_TAG,
    RunStatus,
    _clean_key,
    _ContextMixin,
    _json_safe,
    _param_value,
    check_status,
    flatten_params,
    stage_run_tags,
)
from pipeline.tracking.models import (
    _model_name,
    _on_cpu,
    _pinned_requirements_check,
    _pip_requirements,
    _quiet_pickle_warning,
)
from pipeline.tracking.store import _ensure_experiment, find_repo_root, init_store

logger = logging.getLogger(__name__)

_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit of one log_batch call
_FALLBACK_MAX_PARAM_LEN = 500  # mlflow < 2.x limit; the installed limit is read from mlflow when available


def _max_param_len() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH)
    except ImportError:  # pragma: no cover - depends on the mlflow version
        return _FALLBACK_MAX_PARAM_LEN


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
        start_time: the run's start, Unix milliseconds; default now.
        run_tags: the run's tags as :func:`~pipeline.tracking.base.stage_run_tags` gave them in the process that
            recorded the run (a journal replay); default computed here from ``stage``, ``tags``, the environment and
            ``parent_run_id``.
        context_tags: mlflow's system tags (user, source name and type, git) as resolved for that process; default
            resolved here by mlflow's tag-context registry, as the fluent ``mlflow.start_run`` does.
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
        start_time: int | None = None,
        run_tags: Mapping[str, str] | None = None,
        context_tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.repo_root = Path(repo_root).resolve() if repo_root is not None else find_repo_root()
        self.tracking_uri = init_store(self.repo_root, experiment, tracking_uri)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._max_param_len = _max_param_len()
        experiment_id = _ensure_experiment(self._client, experiment, self.repo_root)

        if run_tags is None:
            run_tags = stage_run_tags(stage, tags, self.repo_root, parent_run_id)
        run_tags = {str(k): str(v) for k, v in run_tags.items()}
        if context_tags is None:
            from mlflow.tracking.context.registry import resolve_tags

            # Same system tags (user, source name, git commit) that the fluent ``mlflow.start_run`` resolves.
            resolved = resolve_tags(run_tags)
        else:
            resolved = {**context_tags, **run_tags}
        run = self._client.create_run(experiment_id, start_time=start_time, run_name=run_name, tags=resolved)
        self.run_id: str | None = run.info.run_id
        self.run_name = run_name
        self.experiment_id = experiment_id
        self._model_tags = {k: v for k, v in run_tags.items() if k != PARENT_TAG}
        self._closed = False
        parent = run_tags.get(PARENT_TAG)
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

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, *, timestamp: int | None = None
    ) -> None:
        """Log scalar metrics at ``step`` (default 0) and ``timestamp`` (Unix ms, default now); NaN values are skipped
        (an empty shot group is NaN)."""
        self.log_metric_rows([(metrics, step, timestamp)])

    def log_metric_rows(self, rows: Sequence[tuple[Mapping[str, float], int | None, int | None]]) -> None:
        """:meth:`log_metrics` of many ``(metrics, step, timestamp)`` rows in as few writes as MLflow allows (1000
        metrics per ``log_batch``): a replayed 300-epoch history is a few SQLite transactions, not 300."""
        from mlflow.entities import Metric

        entries = []
        for metrics, step, timestamp in rows:
            now = int(time.time() * 1000) if timestamp is None else int(timestamp)
            for key, value in metrics.items():
                value = float(value)
                if math.isnan(value):
                    logger.debug("Skipping NaN metric %s", key)
                    continue
                entries.append(Metric(_clean_key(key), value, now, int(step or 0)))
        for start in range(0, len(entries), _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[start:start + _MAX_METRICS_PER_BATCH])

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

    def close(self, status: RunStatus = "FINISHED", *, end_time: int | None = None) -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED) at ``end_time`` (Unix ms, default now); later calls
        do nothing."""
        if self._closed:
            return
        check_status(status)
        self._client.set_terminated(self.run_id, status=status, end_time=end_time)
        self._closed = True
