"""The Prefect flow over ``dvc.yaml`` (the only module that imports prefect).

The DAG is defined once, in ``dvc.yaml``; the engine lives in :mod:`pipeline.orchestrate` and knows nothing of
Prefect. The flow reads DVC's resolved stage graph (:func:`pipeline.orchestrate.graph.stage_graph`), applies config
overrides the way ``dvc exp run -S`` does (:func:`pipeline.orchestrate.overrides.apply_overrides`; the stages then run
in the workspace, no experiment ref is created), and hands the graph to the shared scheduler
(:func:`pipeline.orchestrate.execution.run_graph`) with one Prefect task per stage, so independent stages (teachers,
index builds) run concurrently, at most ``max_parallel`` at a time. Prefect adds what it is for: a UI with run
parameters, per-stage task runs and logs, and retries.

Each task runs ``dvc --wait-for-lock repro --single-item <stage>``
(:func:`pipeline.orchestrate.execution.run_stage`). DVC alone decides what to skip: tasks use Prefect's ``NO_CACHE``
and report whether DVC ran the stage or found it up to date / in its run cache. A task retries on DVC lock errors
and only on them: a failing stage command is not retried.

With MLflow tracking on, the flow opens a parent run and passes its id to every stage through
``LONGTAIL_PARENT_RUN_ID``, so each stage's run is its child.

CLI: ``python -m pipeline.flow run [-S key=value ...] [-t target ...] [--force] [-j N]`` runs once (ephemeral
Prefect); ``python -m pipeline.flow serve`` serves the deployment ``longtail-pipeline/longtail`` for the UI. Without
Prefect, ``python -m pipeline.orchestrate run`` runs the same graph with the same scheduler.
"""

import argparse
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pipeline.dvc_locks import clear_stale_locks
from pipeline.orchestrate.execution import (
    LOCK_RETRIES,
    LOCK_RETRY_DELAY_S,
    StageLockError,
    StageStatus,
    run_graph,
    run_stage,
    threads_per_stage,
)
from pipeline.orchestrate.graph import select_stages, stage_graph
from pipeline.orchestrate.overrides import apply_overrides
from pipeline.tracking import create_tracker, find_repo_root, init_store, tracking_enabled

logger = logging.getLogger(__name__)

FLOW_NAME = "longtail-pipeline"
DEPLOYMENT_NAME = "longtail"
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
    stage: str, repo_root: str, force: bool = False, parent_run_id: str | None = None, threads: int | None = None
) -> StageStatus:
    """Run ``dvc --wait-for-lock repro --single-item <stage>`` in ``repo_root``, streaming its output to the run log.

    Args:
        stage: stage name (``teacher@r32``).
        repo_root: root of the DVC repository.
        force: pass ``--force`` (run even when up to date).
        parent_run_id: MLflow parent run id exported to the stage as ``LONGTAIL_PARENT_RUN_ID``.
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the stage unless set already; ``None`` leaves them.

    Returns:
        'ran' or 'skipped'.

    Raises:
        StageLockError: DVC could not take a lock (the task is retried).
        StageFailedError: the stage failed (not retried).
    """
    return run_stage(stage, repo_root, force=force, parent_run_id=parent_run_id, threads=threads, log=get_run_logger())


# --------------------------------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------------------------------
def _run_graph(
    graph: dict[str, list[str]], repo_root: str, force: bool, max_parallel: int, parent_run_id: str | None
) -> dict[str, StageStatus]:
    """The shared scheduler with one ``repro_stage`` task per stage (``wait_for`` draws the edges in the UI)."""
    threads = threads_per_stage(max_parallel)

    def submit(name: str, upstream: list[PrefectFuture[StageStatus]]) -> PrefectFuture[StageStatus]:
        return repro_stage.submit(name, repo_root, force, parent_run_id, threads, wait_for=upstream)

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
            description="Hydra overrides applied to params.yaml like `dvc exp run -S`, e.g. `dataset=cifar10_lt` or "
            "`teachers.r32.epochs=5`; empty leaves params.yaml untouched.",
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
) -> dict[str, StageStatus]:
    """Reproduce the DVC pipeline (or ``targets``), one Prefect task per stage, independent stages in parallel.

    Prefect shows these descriptions in the deployment's run form.

    Args:
        overrides: Hydra overrides applied to params.yaml the way `dvc exp run -S` applies them, e.g.
            `dataset=cifar10_lt` or `teachers.r32.epochs=5`; empty leaves params.yaml untouched.
        targets: Stages (or foreach groups such as `teacher`) to reproduce, with everything upstream; empty = all.
        force: Run the selected stages even when DVC finds them up to date.
        max_parallel: Maximum number of stages running at the same time.
        repo_root: DVC repository root; default: the repository of the working directory.

    Returns:
        ``{stage: 'ran' | 'skipped'}`` in execution order.
    """
    log = get_run_logger()
    root = os.fspath(Path(repo_root).resolve() if repo_root else find_repo_root(Path.cwd()))
    for msg in clear_stale_locks(root):
        log.warning("Cleared stale DVC lock: %s", msg)
    apply_overrides(root, list(overrides))
    graph = select_stages(stage_graph(root), targets)
    log.info("%d stage(s) to check: %s", len(graph), ", ".join(graph))

    tracker = None
    if tracking_enabled():
        init_store(root)  # create the SQLite store before stages open it in parallel (ECOSYSTEM.md §4)
        from prefect.runtime import flow_run

        tracker = create_tracker(
            "pipeline",
            f"pipeline-{flow_run.name or 'local'}",
            {"prefect_flow_run_id": flow_run.id or "", "targets": ",".join(targets) or "all"},
            repo_root=root,
            parent_run_id="",  # the pipeline run is the parent, never a child
        )
        tracker.log_params(
            {
                "overrides": " ".join(overrides),
                "targets": ",".join(targets),
                "force": force,
                "max_parallel": max_parallel,
            }
        )
    try:
        statuses = _run_graph(graph, root, force, max_parallel, tracker.run_id if tracker else None)
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
    srv = sub.add_parser("serve", help="serve the deployment for the Prefect UI (needs `prefect server start`)")
    srv.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME})")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.name)
        return 0
    statuses = longtail_pipeline(
        overrides=args.override,
        targets=args.target,
        force=args.force,
        max_parallel=args.max_parallel,
        repo_root=args.repo,
    )
    width = max((len(n) for n in statuses), default=0)
    for name, status in statuses.items():
        print(f"{name:<{width}}  {status}")
    return 0


if __name__ == "__main__":
    # Re-import so the flow object belongs to `pipeline.flow` (not `__main__`): served deployments load it by path.
    from pipeline.flow import main as _main

    raise SystemExit(_main())
