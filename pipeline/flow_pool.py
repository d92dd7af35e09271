"""The work-pool executor of the Prefect flow: one DVC stage as a flow run on a worker, and the flow's side of it.

:func:`longtail_stage` is the flow a worker runs (deployment ``longtail-stage/run-stage`` on a Prefect ``process``
work pool, registered by :func:`deploy_stage`): in its own clone it checks out the pinned commit, ``dvc pull``s the
stage's inputs from the shared DVC remote, runs ``dvc repro --single-item`` and ``dvc push``es the outputs and the run
cache (the steps are in :mod:`pipeline.orchestrate.pool`, without Prefect). On the submitting side,
:func:`run_graph_on_pool` drives the shared scheduler with one :func:`pool_stage` task per stage, and
:func:`collect_pool_outputs` brings the workers' results into the isolated worktree that becomes the DVC experiment.
:mod:`pipeline.flow` (the pipeline flow and its CLI) and this module are the only ones that import prefect.
"""

import json
import logging
import os
import socket
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from pydantic import Field

from pipeline.orchestrate import pool as pool_steps
from pipeline.orchestrate.execution import StageFailedError, run_graph, run_stage, run_stage_retrying
from pipeline.orchestrate.graph import find_stage
from pipeline.orchestrate.workspace import stage_env, uncached_outputs

logger = logging.getLogger(__name__)

STAGE_FLOW_NAME = "longtail-stage"  # one DVC stage on a work-pool worker
STAGE_DEPLOYMENT_NAME = "run-stage"
STAGE_DEPLOYMENT = f"{STAGE_FLOW_NAME}/{STAGE_DEPLOYMENT_NAME}"
POOL_NAME = "longtail"
STAGE_RESULT_ARTIFACT = "dvc-stage-result"  # artifact type of a pool stage's result (its dvc.lock entry)
POOL_POLL_S = 2.0


# --------------------------------------------------------------------------------------------------------------------
# One stage on a work-pool worker
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
    params, ``dvc pull`` the inputs, ``dvc repro --single-item``, ``dvc push`` the outputs and the run cache.

    Returns:
        ``{"stage", "status" ('ran' | 'skipped'), "lock" (the stage's dvc.lock entry), "worker", "repo"}``, also
        recorded as an artifact of type ``dvc-stage-result`` on the flow run (how the submitting side reads it).
    """
    from prefect.artifacts import Artifact

    log = get_run_logger()
    root = pool_steps.worker_repo()
    worker = _worker_name(root)
    log.info("[%s] on worker %s (%s) at %s", stage, worker, root, rev[:12])
    pool_steps.prepare_stage(root, rev, list(overrides), dict(upstream_locks), list(pull), log)
    status = run_stage_retrying(
        stage, root, force=force, parent_run_id=parent_run_id, env=stage_env(root, root, dict(tags)), pull=True, log=log
    )
    pool_steps.push_stage(root, stage, log)
    result = {
        "stage": stage,
        "status": status,
        "lock": pool_steps.lock_entry(root, stage),
        "worker": worker,
        "repo": str(root),
    }
    Artifact(
        type=STAGE_RESULT_ARTIFACT,
        data=result,
        description=f"{stage}: {status} on {worker}; its dvc.lock entry (outputs pushed to the DVC remote)",
    ).create()
    return result


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


@task(cache_policy=NO_CACHE, task_run_name="pool:{stage}")
def pool_stage(stage: str, parameters: dict[str, Any], deployment: str = STAGE_DEPLOYMENT) -> dict[str, Any]:
    """Send one stage to the work pool as a flow run of ``deployment`` and wait for it (a subflow of this task).

    Raises:
        StageFailedError: the flow run did not complete (its logs are on the worker's flow run).
    """
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"stage": stage, **parameters}, timeout=None, poll_interval=POOL_POLL_S)
    state = run.state
    if state is None or not state.is_completed():
        raise StageFailedError(
            f"{stage}: flow run {run.name} ({run.id}) of {deployment} ended "
            f"{state.type.value if state else 'without a state'}: {state.message if state else ''}"
        )
    return _stage_result(run.id)


# --------------------------------------------------------------------------------------------------------------------
# The submitting side
# --------------------------------------------------------------------------------------------------------------------
def run_graph_on_pool(
    graph: dict[str, list[str]],
    rev: str,
    overrides: list[str],
    force: bool,
    max_parallel: int,
    parent_run_id: str | None,
    tags: dict[str, str],
    deployment: str,
) -> dict[str, dict[str, Any]]:
    """The shared scheduler with one ``pool_stage`` task (a flow run on the work pool) per stage.

    A stage is sent once its upstream flow runs completed, i.e. once their outputs are in the DVC remote; it gets
    the dvc.lock entries of everything upstream of it (transitively) and pulls the outputs of its direct upstream
    stages. ``max_parallel`` bounds the flow runs in flight; the workers' ``--limit`` bounds what each one runs.
    """
    futures: dict[str, PrefectFuture[dict[str, Any]]] = {}

    def upstream_closure(name: str) -> list[str]:
        seen: list[str] = []
        todo = list(graph[name])
        while todo:
            up = todo.pop()
            if up not in seen:
                seen.append(up)
                todo.extend(graph[up])
        return [n for n in graph if n in seen]  # graph order

    def submit(name: str, upstream: list[PrefectFuture[dict[str, Any]]]) -> PrefectFuture[dict[str, Any]]:
        locks = {up: futures[up].result()["lock"] for up in upstream_closure(name)}
        parameters = {
            "rev": rev,
            "overrides": overrides,
            "upstream_locks": locks,
            "pull": list(graph[name]),
            "force": force,
            "parent_run_id": parent_run_id,
            "tags": tags,
        }
        futures[name] = pool_stage.submit(name, parameters, deployment, wait_for=upstream)
        return futures[name]

    return run_graph(graph, submit, as_completed, max_parallel)


def collect_pool_outputs(worktree: Path, graph: dict[str, list[str]], results: dict[str, dict[str, Any]]) -> None:
    """Bring a pool run's record into the submitting side's worktree, for ``dvc exp save``.

    The workers' dvc.lock entries are written into the worktree's ``dvc.lock``; the cached outputs are pulled from
    the DVC remote (into the workspace's cache, which the worktree shares); outputs kept out of the cache but not
    ``persist`` (the reports and metrics ``dvc exp show`` reads) are checked out as the lock entries record them, from
    the objects the workers pushed (:func:`pipeline.orchestrate.pool.restore_uncached`), not rerun.
    """
    log = get_run_logger()
    pool_steps.merge_lock_entries(worktree, {name: results[name]["lock"] for name in graph})
    pool_steps.pull_run_cache(worktree, log)
    pool_steps.pull_stages(worktree, list(graph), log)
    uncached = set(uncached_outputs(worktree))
    from dvc.repo import Repo

    with Repo(os.fspath(worktree)) as repo:
        restore = [
            name for name in graph if any(not out.persist and not out.use_cache for out in find_stage(repo, name).outs)
        ]
    log.info("Restoring the uncached outputs of %s from the remote (%d uncached paths)", restore, len(uncached))
    for name in restore:
        if pool_steps.restore_uncached(worktree, name, log):
            continue
        status = run_stage(name, worktree, pull=True, force=True, log=log)
        log.warning("[%s] could not be restored from what the workers pushed: it %s on the submitting side", name,
                    status)


def deploy_stage(pool: str = POOL_NAME, name: str = STAGE_DEPLOYMENT_NAME) -> str:
    """Register the ``longtail-stage/<name>`` deployment on the ``process`` work pool ``pool`` (created if missing).

    The entrypoint is the module path ``pipeline.flow.longtail_stage`` and there are no pull steps: a worker imports
    the flow from its own clone (``PYTHONPATH``) and :func:`longtail_stage` checks out the pinned commit itself.
    Needs ``PREFECT_API_URL`` of a running server. Returns the deployment's id.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            logger.info("Created work pool %s (process)", pool)
        except ObjectAlreadyExists:
            pass
    deployment = longtail_stage.to_deployment(
        name=name, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH
    )
    return str(deployment.apply())
