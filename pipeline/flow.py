"""The Prefect flow over ``dvc.yaml`` (the only module that imports prefect).

The DAG is defined once, in ``dvc.yaml``; the engine lives in :mod:`pipeline.orchestrate` and knows nothing of
Prefect. The flow reads DVC's resolved stage graph (:func:`pipeline.orchestrate.graph.stage_graph`) and hands it to the
shared scheduler (:func:`pipeline.orchestrate.execution.run_graph`) with one Prefect task per stage, so independent
stages (teachers, index builds) run concurrently, at most ``max_parallel`` at a time. Prefect adds what it is for: a
UI with run parameters, per-stage task runs and logs, and retries.

A run with config overrides (Hydra grammar, as ``dvc exp run -S``) runs isolated
(:mod:`pipeline.orchestrate.workspace`): in a temporary git worktree of the pinned ``HEAD``, saved as a DVC
experiment, the workspace untouched. A run without overrides reproduces in the workspace, as ``make run`` does.
``executor="pool"`` sends each stage as a flow run of the deployment ``longtail-stage/run-stage``
(:func:`longtail_stage`) to a Prefect ``process`` work pool, whose workers run it in their own clones with a shared
DVC remote (:func:`run_graph_on_pool`; the steps without Prefect in :mod:`pipeline.orchestrate.pool`,
docs/scale_out.md).

Each task runs ``dvc --wait-for-lock repro --single-item <stage>``
(:func:`pipeline.orchestrate.execution.run_stage`). DVC alone decides what to skip: tasks use Prefect's ``NO_CACHE``
and report whether DVC ran the stage or found it up to date / in its run cache. A task retries on DVC lock errors
and only on them: a failing stage command is not retried.

With MLflow tracking on, the flow opens a parent run and passes its id to every stage through
``LONGTAIL_PARENT_RUN_ID``, so each stage's run is its child.

CLI: ``python -m pipeline.flow run [-S key=value ...] [-t target ...] [--force] [-j N] [--executor local|pool]
[--isolated | --in-workspace] [--name NAME]`` runs once (ephemeral Prefect unless ``PREFECT_API_URL`` is set);
``python -m pipeline.flow serve`` serves the deployment ``longtail-pipeline/longtail`` for the UI;
``python -m pipeline.flow deploy-stage --pool POOL`` registers ``longtail-stage/run-stage`` on a work pool. Without
Prefect, ``python -m pipeline.orchestrate run`` runs the same graph with the same scheduler.
"""

import argparse
import json
import logging
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pipeline.dvc_locks import clear_stale_locks
from pipeline.orchestrate import pool as pool_steps
from pipeline.orchestrate.execution import (
    LOCK_RETRIES,
    LOCK_RETRY_DELAY_S,
    StageFailedError,
    StageLockError,
    StageStatus,
    run_graph,
    run_stage,
    run_stage_retrying,
    threads_per_stage,
)
from pipeline.orchestrate.graph import select_stages, stage_graph, upstream_closure
from pipeline.orchestrate.overrides import apply_overrides
from pipeline.orchestrate.workspace import (
    experiment_name,
    isolated_worktree,
    pin_revision,
    save_experiment,
    stage_env,
    stages_with_outputs,
)
from pipeline.tracking import create_tracker, find_repo_root, init_store, tracking_enabled

logger = logging.getLogger(__name__)

FLOW_NAME = "longtail-pipeline"
DEPLOYMENT_NAME = "longtail"
STAGE_FLOW_NAME = "longtail-stage"  # one DVC stage on a work-pool worker
STAGE_DEPLOYMENT_NAME = "run-stage"
STAGE_DEPLOYMENT = f"{STAGE_FLOW_NAME}/{STAGE_DEPLOYMENT_NAME}"
POOL_NAME = "longtail"
STAGE_RESULT_ARTIFACT = "dvc-stage-result"  # artifact type of a pool stage's result (its dvc.lock entry)
POOL_POLL_S = 2.0
Executor = Literal["local", "pool"]
MAX_PARALLEL_LIMIT = 16  # threads of the flow's task runner; the scheduler keeps at most max_parallel in flight


# --------------------------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------------------------
def _retry_on_lock_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the stage failed on a DVC lock."""
    try:
        state.result()
    except StageLockError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(
    cache_policy=NO_CACHE,  # DVC's dvc.lock and run cache alone decide what to skip
    retries=LOCK_RETRIES,
    retry_delay_seconds=LOCK_RETRY_DELAY_S,
    retry_condition_fn=_retry_on_lock_error,
    task_run_name="dvc:{stage}",
)
def repro_stage(
    stage: str,
    repo_root: str,
    force: bool = False,
    parent_run_id: str | None = None,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> StageStatus:
    """Run ``dvc --wait-for-lock repro --single-item <stage>`` in ``repo_root``, streaming its output to the run log.

    Args:
        stage: stage name (``teacher@r32``).
        repo_root: root of the DVC repository.
        force: pass ``--force`` (run even when up to date).
        parent_run_id: MLflow parent run id exported to the stage as ``LONGTAIL_PARENT_RUN_ID``.
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the stage unless set already; ``None`` leaves them.
        env: extra environment of the stage (:func:`pipeline.orchestrate.workspace.stage_env`).

    Returns:
        'ran' or 'skipped'.

    Raises:
        StageLockError: DVC could not take a lock (the task is retried).
        StageFailedError: the stage failed (not retried).
    """
    return run_stage(
        stage, repo_root, force=force, parent_run_id=parent_run_id, threads=threads, env=env, log=get_run_logger()
    )


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
# The flow
# --------------------------------------------------------------------------------------------------------------------
def _run_graph(
    graph: dict[str, list[str]],
    repo_root: str,
    force: bool,
    max_parallel: int,
    parent_run_id: str | None,
    env: dict[str, str] | None = None,
) -> dict[str, StageStatus]:
    """The shared scheduler with one ``repro_stage`` task per stage (``wait_for`` draws the edges in the UI)."""
    threads = threads_per_stage(max_parallel)

    def submit(name: str, upstream: list[PrefectFuture[StageStatus]]) -> PrefectFuture[StageStatus]:
        return repro_stage.submit(name, repo_root, force, parent_run_id, threads, env, wait_for=upstream)

    return run_graph(graph, submit, as_completed, max_parallel)


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
        futures[name] = pool_stage.submit(name, parameters, deployment, wait_for=upstream)
        return futures[name]

    return run_graph(graph, submit, as_completed, max_parallel)


@flow(
    name=FLOW_NAME,
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_LIMIT),
    validate_parameters=True,
)
def longtail_pipeline(
    overrides: Annotated[
        list[str],
        Field(
            description="Hydra overrides applied to the committed config like `dvc exp run -S`, e.g. "
            "`dataset=cifar10_lt` or `teachers.r32.epochs=5`. A run with overrides runs in an isolated worktree and "
            "is saved as a DVC experiment; the workspace's params.yaml is never touched.",
        ),
    ] = [],  # noqa: B006 - Prefect validates (copies) parameters per run
    targets: Annotated[
        list[str],
        Field(description="Stages (or foreach groups) to reproduce, with everything upstream; empty = all stages."),
    ] = [],  # noqa: B006
    force: Annotated[bool, Field(description="Run the selected stages even when DVC finds them up to date.")] = False,
    max_parallel: Annotated[
        int, Field(ge=1, le=MAX_PARALLEL_LIMIT, description="Maximum number of stages running at the same time.")
    ] = 2,
    repo_root: Annotated[
        str | None, Field(description="DVC repository root; default: the repository of the working directory.")
    ] = None,
    executor: Annotated[
        Executor,
        Field(
            description="`local`: each stage in its own process here; `pool`: each stage a flow run of the "
            f"`{STAGE_DEPLOYMENT}` deployment on a Prefect work pool (workers in their own clones, a DVC remote).",
        ),
    ] = "local",
    isolated: Annotated[
        bool | None,
        Field(
            description="Run in a temporary git worktree of HEAD and save the result as a DVC experiment. Default: "
            "yes with overrides or the pool executor, no otherwise (reproduce in the workspace, as `make run`).",
        ),
    ] = None,
    name: Annotated[
        str | None, Field(description="DVC experiment name of an isolated run; default: the flow run's name.")
    ] = None,
) -> dict[str, StageStatus]:
    """Reproduce the DVC pipeline (or ``targets``), one Prefect task per stage, independent stages in parallel.

    Prefect shows these descriptions in the deployment's run form.

    Args:
        overrides: Hydra overrides applied to the committed config the way `dvc exp run -S` applies them, e.g.
            `dataset=cifar10_lt` or `teachers.r32.epochs=5`; a run with overrides is isolated.
        targets: Stages (or foreach groups such as `teacher`) to reproduce, with everything upstream; empty = all.
        force: Run the selected stages even when DVC finds them up to date.
        max_parallel: Maximum number of stages running at the same time.
        repo_root: DVC repository root; default: the repository of the working directory.
        executor: `local` (stage processes here) or `pool` (flow runs on the work pool's workers).
        isolated: run in a worktree of the pinned commit and save a DVC experiment (default: with overrides or
            on the pool); `False` with overrides applies them in the workspace (the old behaviour).
        name: the experiment's name; default: the flow run's name.

    Returns:
        ``{stage: 'ran' | 'skipped'}`` in execution order.

    Raises:
        DirtyTreeError: an isolated run, but tracked files differ from HEAD.
    """
    from prefect.runtime import flow_run

    log = get_run_logger()
    root = Path(repo_root).resolve() if repo_root else find_repo_root(Path.cwd())
    for msg in clear_stale_locks(root):
        log.warning("Cleared stale DVC lock: %s", msg)
    run_name = flow_run.name or "local"
    if isolated is None:
        isolated = bool(overrides) or executor == "pool"
    if executor == "pool" and not isolated:
        raise ValueError("The pool executor always runs isolated (workers check out a pinned commit): drop isolated")
    if tracking_enabled():
        init_store(root)  # create the SQLite store before stages open it in parallel (ECOSYSTEM.md §4)

    if not isolated:
        apply_overrides(root, list(overrides))  # only with isolated=False: the old, in-workspace behaviour
        tags = {"flow_run": run_name}
        graph = select_stages(stage_graph(root), targets)
        return _drive(graph, root, None, tags, overrides, targets, force, max_parallel, executor, log)

    rev = pin_revision(root)
    exp = experiment_name(name or run_name)
    tags = {"flow_run": run_name, "dvc_exp": exp, "git_rev": rev}
    log.info("Isolated run %s of commit %s with overrides %s", exp, rev[:12], list(overrides) or "none")
    with isolated_worktree(root, rev, exp) as worktree:
        apply_overrides(worktree, list(overrides))
        graph = select_stages(stage_graph(worktree), targets)
        statuses = _drive(graph, root, worktree, tags, overrides, targets, force, max_parallel, executor, log, rev)
        committed = stages_with_outputs(worktree, graph)  # on a pool, checkpoints stay on the workers
        save_experiment(worktree, exp, committed or list(graph))
    log.info("Saved as DVC experiment %r: `dvc exp show`, `dvc exp apply %s`", exp, exp)
    return statuses


def _drive(
    graph: dict[str, list[str]],
    root: Path,
    worktree: Path | None,
    tags: dict[str, str],
    overrides: list[str],
    targets: list[str],
    force: bool,
    max_parallel: int,
    executor: Executor,
    log: Any,
    rev: str | None = None,
) -> dict[str, StageStatus]:
    """Run ``graph`` with ``executor`` under one MLflow parent run, in ``worktree`` (isolated) or else ``root``."""
    run_root = worktree or root
    log.info("%d stage(s) to check: %s", len(graph), ", ".join(graph))
    tracker = None
    if tracking_enabled():
        from prefect.runtime import flow_run

        tracker = create_tracker(
            "pipeline",
            f"pipeline-{flow_run.name or 'local'}",
            {"prefect_flow_run_id": flow_run.id or "", "targets": ",".join(targets) or "all", **tags},
            repo_root=root,
            parent_run_id="",  # the pipeline run is the parent, never a child
        )
        tracker.log_params(
            {
                "overrides": " ".join(overrides),
                "targets": ",".join(targets),
                "force": force,
                "max_parallel": max_parallel,
                "executor": executor,
            }
        )
    parent = tracker.run_id if tracker else None
    try:
        if executor == "pool":
            assert worktree is not None and rev is not None  # the pool executor is always isolated
            results = run_graph_on_pool(
                graph,
                rev,
                list(overrides),
                force,
                max_parallel,
                parent,
                tags,
                os.environ.get("LONGTAIL_STAGE_DEPLOYMENT", STAGE_DEPLOYMENT),
            )
            for name, result in results.items():
                log.info("[%s] %s on %s", name, result["status"], result["worker"])
            pool_steps.collect_outputs(worktree, {name: results[name]["lock"] for name in graph}, log)
            statuses: dict[str, StageStatus] = {name: result["status"] for name, result in results.items()}
            if tracker is not None:
                tracker.set_tags({f"worker.{name}": result["worker"] for name, result in results.items()})
        else:
            env = stage_env(worktree, root, tags)
            statuses = _run_graph(graph, os.fspath(run_root), force, max_parallel, parent, env)
        if tracker is not None:
            tracker.set_tags({f"stage.{name}": status for name, status in statuses.items()})
    except BaseException:
        if tracker is not None:
            tracker.close("FAILED")
        raise
    if tracker is not None:
        tracker.close("FINISHED")
    ran = [n for n, s in statuses.items() if s == "ran"]
    log.info(
        "Ran %d stage(s)%s; %d up to date", len(ran), f" ({', '.join(ran)})" if ran else "", len(statuses) - len(ran)
    )
    return statuses


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


def serve(name: str = DEPLOYMENT_NAME, limit: int | None = 1) -> None:
    """Serve the flow as deployment ``longtail-pipeline/<name>`` (needs ``PREFECT_API_URL`` of a running server).

    Args:
        name: deployment name.
        limit: maximum concurrent flow runs of this deployment (1: two pipeline runs would edit params.yaml and
            the DVC workspace at the same time).
    """
    longtail_pipeline.serve(name=name, limit=limit)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m pipeline.flow {run,serve}``)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.flow", description="Prefect flow over dvc.yaml")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline once (ephemeral Prefect unless PREFECT_API_URL is set)")
    run.add_argument("-S", "--override", action="append", default=[], help="Hydra override, e.g. dataset=cifar10_lt")
    run.add_argument("-t", "--target", action="append", default=[], help="stage or group to reproduce (repeatable)")
    run.add_argument("-f", "--force", action="store_true", help="run stages even when up to date")
    run.add_argument("-j", "--max-parallel", type=int, default=2, help="stages running at once (default 2)")
    run.add_argument("--repo", default=None, help="DVC repository root (default: from the working directory)")
    run.add_argument(
        "--executor",
        choices=["local", "pool"],
        default="local",
        help=f"local: stage processes here (default); pool: flow runs of {STAGE_DEPLOYMENT} on the work pool",
    )
    iso = run.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolated",
        dest="isolated",
        action="store_true",
        default=None,
        help="run in a worktree of HEAD and save a DVC experiment (default with -S or --executor pool)",
    )
    iso.add_argument(
        "--in-workspace",
        dest="isolated",
        action="store_false",
        help="apply -S overrides to the workspace's params.yaml and reproduce there (the old behaviour)",
    )
    run.add_argument("--name", default=None, help="experiment name of an isolated run (default: the flow run name)")
    srv = sub.add_parser("serve", help="serve the deployment for the Prefect UI (needs `prefect server start`)")
    srv.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME})")
    dep = sub.add_parser(
        "deploy-stage", help=f"register {STAGE_DEPLOYMENT} on a process work pool (needs `prefect server start`)"
    )
    dep.add_argument("--pool", default=POOL_NAME, help=f"work pool, created if missing (default {POOL_NAME})")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.name)
        return 0
    if args.command == "deploy-stage":
        print(f"{STAGE_DEPLOYMENT} on pool {args.pool}: {deploy_stage(args.pool)}")
        return 0
    statuses = longtail_pipeline(
        overrides=args.override,
        targets=args.target,
        force=args.force,
        max_parallel=args.max_parallel,
        repo_root=args.repo,
        executor=args.executor,
        isolated=args.isolated,
        name=args.name,
    )
    width = max((len(n) for n in statuses), default=0)
    for name, status in statuses.items():
        print(f"{name:<{width}}  {status}")
    return 0


if __name__ == "__main__":
    # Re-import so the flow object belongs to `pipeline.flow` (not `__main__`): served deployments load it by path.
    from pipeline.flow import main as _main

    raise SystemExit(_main())
