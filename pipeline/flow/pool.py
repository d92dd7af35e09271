"""Stages on a Prefect work pool: the stage flow the workers run, and the submitting side (imported by flow.py).

A pool stage is a flow run of the deployment ``longtail-stage/run-stage`` (:func:`longtail_stage`), executed by a
``process`` worker in its own clone (the steps without Prefect are in :mod:`pipeline.orchestrate.pool`,
docs/scale_out.md). The submitting flow (:mod:`pipeline.flow`) sends one per stage (:func:`pool_stage`) through the
shared scheduler (:func:`run_graph_on_pool`).

GPU hosts die (preempted spot nodes, OOM kills, reboots), and a flow run whose process died with its worker stays
``Running`` in Prefect: nothing reports its end. Lost stages are found with Prefect's own mechanism, two proactive
automations restricted to the stage deployment (:mod:`pipeline.flow.automations`, created idempotently by
:func:`deploy_stage`; a self-hosted server has no managed one):

* the stage flow runs send heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in the deployment's job
  variables by :func:`deploy_stage`; 30 s, Prefect's minimum), and the automation of Prefect's "detect zombie flows"
  recipe marks a run ``Crashed`` when no heartbeat (nor a final state) follows the last one within ``crash_after_s``
  (default 90 s: three missed beats);
* a run that a worker took (``Pending``) but whose worker died before the run's process started never sends a
  heartbeat: the second automation marks it ``Crashed`` when it is not ``Running`` (nor final) within
  ``pending_after_s`` of ``Pending`` (default 120 s; a live process worker starts a run in seconds).

The server evaluates both every 5 s, so a lost stage is marked 0-5 s after its window ends. A flow-run process that
dies while its worker lives is marked ``Crashed`` by the worker at once.

:func:`pool_stage` resubmits a ``Crashed`` stage (never a ``Failed`` one: the stage's own error would only repeat) up
to ``crash_retries`` times, whichever automation crashed it; any live worker takes it, and it resumes from the last
checkpoint its lost worker pushed (:mod:`pipeline.orchestrate.checkpoint_sync`). With the retries spent, or a run that
is not started while its pool has no live worker for ``NO_WORKER_S``, the stage fails with one line that says what
happened, and so does the pipeline run. Nothing waits forever.

An interrupt (Ctrl-C) of the submitting flow cancels every stage run it submitted (:func:`cancel_submitted`) and
stops the threads that wait on them, so one Ctrl-C ends ``python -m pipeline.flow run``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from pydantic import Field

from pipeline.flow.automations import CRASH_AFTER_S, MIN_WINDOW_S, PENDING_AFTER_S, ensure_stage_automations
from pipeline.orchestrate import checkpoint_sync
from pipeline.orchestrate import pool as pool_steps
from pipeline.orchestrate.execution import StageFailedError, run_graph, run_stage_retrying
from pipeline.orchestrate.graph import upstream_closure
from pipeline.orchestrate.workspace import stage_env

logger = logging.getLogger(__name__)

STAGE_FLOW_NAME = "longtail-stage"  # one DVC stage on a work-pool worker
STAGE_DEPLOYMENT_NAME = "run-stage"
STAGE_DEPLOYMENT = f"{STAGE_FLOW_NAME}/{STAGE_DEPLOYMENT_NAME}"
POOL_NAME = "longtail"
STAGE_RESULT_ARTIFACT = "dvc-stage-result"  # artifact type of a pool stage's result (its dvc.lock entry)
POOL_POLL_S = 2.0
CRASH_RETRIES = 2  # resubmissions of a stage whose flow run crashed (a lost worker)
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the stage runs (Prefect's minimum)
NO_WORKER_S = 300  # a run not started while the pool has had no live worker for this long fails


# --------------------------------------------------------------------------------------------------------------------
# The worker side: one stage in the worker's clone
# --------------------------------------------------------------------------------------------------------------------
def _worker_name(root: Path) -> str:
    return os.environ.get("LONGTAIL_WORKER_NAME") or f"{socket.gethostname()}:{root}"


@flow(name=STAGE_FLOW_NAME, validate_parameters=True, flow_run_name="{stage}")
def longtail_stage(
    stage: Annotated[str, Field(description="DVC stage to reproduce, e.g. `teacher@ce`.")],
    rev: Annotated[str, Field(description="Git commit to check out (the triggering run pins it).")],
    overrides: Annotated[list[str], Field(description="Hydra overrides composed into params.yaml.")] = [],  # noqa: B006
    upstream_locks: Annotated[
        dict[str, dict[str, Any]], Field(description="dvc.lock entries of the stages upstream (from their workers).")
    ] = {},  # noqa: B006
    pull: Annotated[list[str], Field(description="Stages whose outputs to `dvc pull` first (the inputs).")] = [],  # noqa: B006
    force: bool = False,
    parent_run_id: str | None = None,
    tags: Annotated[dict[str, str], Field(description="MLflow tags of the stage's run (flow_run, dvc_exp).")] = {},  # noqa: B006
) -> dict[str, Any]:
    """Reproduce one DVC stage in this worker's clone (:mod:`pipeline.orchestrate.pool`): checkout ``rev``, compose
    params, ``dvc pull`` the inputs, fetch the stage's last pushed checkpoint, ``dvc repro --single-item`` (which
    pushes each new checkpoint), ``dvc push`` the outputs and the run cache.

    Returns:
        ``{"stage", "status" ('ran' | 'skipped'), "lock" (the stage's dvc.lock entry), "worker", "repo",
        "fetched" (checkpoints it started from)}``, also recorded as an artifact of type ``dvc-stage-result`` on the
        flow run (how the submitting side reads it).
    """
    from prefect.artifacts import Artifact

    log = get_run_logger()
    root = pool_steps.worker_repo()
    worker = _worker_name(root)
    log.info("[%s] on worker %s (%s) at %s", stage, worker, root, rev[:12])
    pool_steps.prepare_stage(root, rev, list(overrides), dict(upstream_locks), list(pull), log)
    store = checkpoint_sync.store_url(root, rev, list(overrides))
    fetched = checkpoint_sync.fetch(root, stage, store, log) if store else []
    env = stage_env(root, root, dict(tags))
    if store:
        env[checkpoint_sync.PUSH_ENV] = store
    status = run_stage_retrying(stage, root, force=force, parent_run_id=parent_run_id, env=env, pull=True, log=log)
    pool_steps.push_stage(root, stage, log)
    if store:
        checkpoint_sync.prune(root, stage, store)
    result = {
        "stage": stage,
        "status": status,
        "lock": pool_steps.lock_entry(root, stage),
        "worker": worker,
        "repo": str(root),
        "fetched": fetched,
    }
    Artifact(
        type=STAGE_RESULT_ARTIFACT,
        data=result,
        description=f"{stage}: {status} on {worker}; its dvc.lock entry (outputs pushed to the DVC remote)",
    ).create()
    return result


# --------------------------------------------------------------------------------------------------------------------
# The submitting side
# --------------------------------------------------------------------------------------------------------------------
_STOP = threading.Event()  # set on an interrupt of the submitting flow: the waiting threads give up
_SUBMITTED: set[UUID] = set()  # stage flow runs of this process not yet final
_SUBMITTED_LOCK = threading.Lock()


class PoolStageInterrupted(StageFailedError):
    """The submitting flow was interrupted while the stage ran (its flow run is cancelled)."""


def _stage_result(flow_run_id: Any) -> dict[str, Any]:
    """The ``dvc-stage-result`` artifact a :func:`longtail_stage` run recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(any_=[STAGE_RESULT_ARTIFACT]),
            )
        )
    if not artifacts:
        raise StageFailedError(f"Flow run {flow_run_id} completed without a {STAGE_RESULT_ARTIFACT} artifact")
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else dict(data)


def _pool_has_live_worker(client: Any, pool: str | None) -> bool:
    from prefect.client.schemas.objects import WorkerStatus

    if not pool:
        return True
    try:
        workers = client.read_workers_for_work_pool(work_pool_name=pool)
    except Exception:  # noqa: BLE001 - an unreadable pool: keep waiting rather than fail a healthy run
        return True
    return any(w.status == WorkerStatus.ONLINE for w in workers)


def _wait_final(run: Any, no_worker_s: float) -> Any:
    """Poll the flow run until its state is final and return it (the flow run, as read last). A run whose worker was
    lost, while it ran or after it took it, is marked ``Crashed`` by an automation and returned like any final run.

    Raises:
        PoolStageInterrupted: the submitting flow was interrupted.
        StageFailedError: the run was not started while its pool had no live worker for ``no_worker_s``.
    """
    from prefect.client.orchestration import get_client

    no_worker_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            current = client.read_flow_run(run.id)
            state = current.state
            if state is not None and state.is_final():
                return current
            if state is None or state.is_scheduled() or state.is_pending():
                if _pool_has_live_worker(client, current.work_pool_name):
                    no_worker_since = None
                elif no_worker_since is None:
                    no_worker_since = time.monotonic()
                elif time.monotonic() - no_worker_since > no_worker_s:
                    _cancel(client, run.id)
                    raise StageFailedError(
                        f"flow run {run.name} waited {no_worker_s:.0f} s with no live worker in pool "
                        f"{current.work_pool_name}: start workers (scripts/pool.sh) and run again"
                    )
            if _STOP.wait(POOL_POLL_S):
                raise PoolStageInterrupted(f"flow run {run.name} cancelled: the pipeline run was interrupted")


def _cancel(client: Any, flow_run_id: UUID) -> None:
    """Cancel a stage flow run: ``Cancelled`` when no worker has it yet, else ``Cancelling`` (its worker stops it)."""
    from prefect.states import Cancelled, Cancelling

    try:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return
        new = Cancelled() if state is None or state.is_scheduled() else Cancelling()
        client.set_flow_run_state(flow_run_id, new, force=True)
    except Exception as exc:  # noqa: BLE001 - best effort, on the way out
        logger.warning("could not cancel flow run %s: %s", flow_run_id, exc)


def cancel_submitted() -> list[UUID]:
    """Stop waiting on, and cancel, every stage flow run this process submitted that has not ended."""
    from prefect.client.orchestration import get_client

    with _SUBMITTED_LOCK:  # before _STOP: a waiting thread that stops forgets its run
        ids = sorted(_SUBMITTED, key=str)
    _STOP.set()
    if ids:
        with get_client(sync_client=True) as client:
            for flow_run_id in ids:
                _cancel(client, flow_run_id)
    return ids


def _describe(state: Any) -> str:
    """``crashed (<the state message's first sentence>)``."""
    message = (state.message or "").split(". ")[0].strip().rstrip(".")
    return f"{state.type.value.lower()} ({message})" if message else state.type.value.lower()


@task(cache_policy=NO_CACHE, task_run_name="pool:{stage}")
def pool_stage(
    stage: str,
    parameters: dict[str, Any],
    deployment: str = STAGE_DEPLOYMENT,
    crash_retries: int = CRASH_RETRIES,
    no_worker_s: float = NO_WORKER_S,
) -> dict[str, Any]:
    """Send one stage to the work pool as a flow run of ``deployment`` and wait for it (a subflow of this task);
    send it again when its flow run crashed (a lost worker), at most ``crash_retries`` times.

    Raises:
        StageFailedError: the flow run failed or was cancelled, or crashed ``crash_retries + 1`` times, or no live
            worker took it (one line; the logs are on the stage's flow runs).
    """
    from prefect.deployments import run_deployment

    log = get_run_logger()
    attempts = crash_retries + 1
    crashes: list[str] = []
    for attempt in range(1, attempts + 1):
        if _STOP.is_set():
            raise PoolStageInterrupted(f"{stage}: not submitted, the pipeline run was interrupted")
        run = run_deployment(deployment, parameters={"stage": stage, **parameters}, timeout=0)
        with _SUBMITTED_LOCK:
            _SUBMITTED.add(run.id)
        try:
            run = _wait_final(run, no_worker_s)  # its name is the stage's once a worker started it
            state = run.state
        except StageFailedError as exc:
            raise StageFailedError(f"{stage}: {exc}") from None
        finally:
            with _SUBMITTED_LOCK:
                _SUBMITTED.discard(run.id)
        if state.is_completed():
            result = _stage_result(run.id)
            if crashes:
                log.info(
                    "[%s] %s on %s after %d crashed attempt(s); resumed from %s",
                    stage,
                    result["status"],
                    result["worker"],
                    len(crashes),
                    ", ".join(result.get("fetched") or []) or "nothing",
                )
            return result
        if not state.is_crashed():
            raise StageFailedError(f"{stage}: flow run {run.name} ({run.id}) ended {_describe(state)}")
        crashes.append(f"flow run {run.name} {_describe(state)}")
        if attempt < attempts:
            log.warning(
                "[%s] %s: submitting it again, attempt %d of %d; any live worker takes it and resumes from its "
                "last pushed checkpoint",
                stage,
                crashes[-1],
                attempt + 1,
                attempts,
            )
    raise StageFailedError(
        f"{stage}: crashed {len(crashes)} time(s), no retry left (crash_retries={crash_retries}); last: {crashes[-1]}"
    )


def run_graph_on_pool(
    graph: dict[str, list[str]],
    rev: str,
    overrides: list[str],
    force: bool,
    max_parallel: int,
    parent_run_id: str | None,
    tags: dict[str, str],
    deployment: str,
    crash_retries: int = CRASH_RETRIES,
) -> dict[str, dict[str, Any]]:
    """The shared scheduler with one ``pool_stage`` task (a flow run on the work pool) per stage.

    A stage is sent once its upstream flow runs completed, i.e. once their outputs are in the DVC remote; it gets
    the dvc.lock entries of everything upstream of it (transitively) and pulls the outputs of its direct upstream
    stages. ``max_parallel`` bounds the flow runs in flight; the workers' ``--limit`` bounds what each one runs. On
    an interrupt (or any error that ends the scheduler early) the stage runs still in flight are cancelled.
    """
    futures: dict[str, PrefectFuture[dict[str, Any]]] = {}
    _STOP.clear()

    def submit(name: str, upstream: list[PrefectFuture[dict[str, Any]]]) -> PrefectFuture[dict[str, Any]]:
        locks = {up: futures[up].result()["lock"] for up in upstream_closure(graph, name)}
        parameters = {
            "rev": rev,
            "overrides": overrides,
            "upstream_locks": locks,
            "pull": list(graph[name]),
            "force": force,
            "parent_run_id": parent_run_id,
            "tags": tags,
        }
        futures[name] = pool_stage.submit(name, parameters, deployment, crash_retries, wait_for=upstream)
        return futures[name]

    try:
        return run_graph(graph, submit, as_completed, max_parallel)
    except (KeyboardInterrupt, SystemExit):
        cancelled = cancel_submitted()
        logger.warning("Interrupted: cancelled %d stage flow run(s) on the pool", len(cancelled))
        raise


# --------------------------------------------------------------------------------------------------------------------
# Set-up: the pool, the stage deployment, its automations (pipeline/flow/automations.py)
# --------------------------------------------------------------------------------------------------------------------
def check_windows(heartbeat_s: int, crash_after_s: int, pending_after_s: int) -> None:
    """Raise ``ValueError`` (one line) for windows the automations cannot use."""
    if crash_after_s <= heartbeat_s:
        raise ValueError(
            f"crash_after_s={crash_after_s} must exceed heartbeat_s={heartbeat_s} (Prefect's recipe: "
            "three heartbeats), or every live stage would be marked Crashed"
        )
    if pending_after_s < MIN_WINDOW_S:
        raise ValueError(
            f"pending_after_s={pending_after_s} must be >= {MIN_WINDOW_S} (Prefect's shortest proactive window)"
        )


def deploy_stage(
    pool: str = POOL_NAME,
    name: str = STAGE_DEPLOYMENT_NAME,
    heartbeat_s: int = HEARTBEAT_S,
    crash_after_s: int = CRASH_AFTER_S,
    pending_after_s: int = PENDING_AFTER_S,
) -> str:
    """Register the ``longtail-stage/<name>`` deployment on the ``process`` work pool ``pool`` (created if missing),
    with flow-run heartbeats every ``heartbeat_s``, and the automations that crash its runs after ``crash_after_s``
    without a heartbeat, or ``pending_after_s`` after a worker took them without starting them
    (:func:`pipeline.flow.automations.ensure_stage_automations`). Idempotent.

    The entrypoint is the module path ``pipeline.flow.pool.longtail_stage`` and there are no pull steps: a worker
    imports the flow from its own clone (``PYTHONPATH``) and :func:`longtail_stage` checks out the pinned commit
    itself. Needs ``PREFECT_API_URL`` of a running server. Returns the deployment's id.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectAlreadyExists

    check_windows(heartbeat_s, crash_after_s, pending_after_s)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            logger.info("Created work pool %s (process)", pool)
        except ObjectAlreadyExists:
            pass
    deployment = longtail_stage.to_deployment(
        name=name,
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}},
    )
    deployment_id = deployment.apply()
    ensure_stage_automations(deployment_id, crash_after_s, pending_after_s)
    return str(deployment_id)
