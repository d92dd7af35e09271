"""The Prefect flow over ``dvc.yaml`` (``pipeline.flow`` is the only package that imports prefect).

The DAG is defined once, in ``dvc.yaml``; the engine lives in :mod:`pipeline.orchestrate` and knows nothing of
Prefect. The flow reads DVC's resolved stage graph (:func:`pipeline.orchestrate.graph.stage_graph`) and hands it to the
shared scheduler (:func:`pipeline.orchestrate.execution.run_graph`) with one Prefect task per stage, so independent
stages (teachers, index builds) run concurrently, at most ``max_parallel`` at a time. Prefect adds what it is for: a
UI with run parameters, per-stage task runs and logs, and retries.

A run with config overrides (Hydra grammar, as ``dvc exp run -S``) runs isolated
(:mod:`pipeline.orchestrate.workspace`): in a temporary git worktree of the pinned ``HEAD``, saved as a DVC
experiment, the workspace untouched. A run without overrides reproduces in the workspace, as ``make run`` does.
``executor="pool"`` sends each stage as a flow run of the deployment ``longtail-stage/run-stage``
(:func:`pipeline.flow.pool.longtail_stage`) to a Prefect ``process`` work pool, whose workers run it in their own
clones with a shared DVC remote (:mod:`pipeline.flow.pool`: a stage whose worker was lost is found by Prefect's
heartbeat automation, resubmitted and resumed from its last pushed checkpoint; the steps without Prefect in
:mod:`pipeline.orchestrate.pool` and :mod:`pipeline.orchestrate.checkpoint_sync`, docs/scale_out.md).

Each task runs ``dvc --wait-for-lock repro --single-item <stage>``
(:func:`pipeline.orchestrate.execution.run_stage`). DVC alone decides what to skip: tasks use Prefect's ``NO_CACHE``
and report whether DVC ran the stage or found it up to date / in its run cache. A task retries on DVC lock errors
and only on them: a failing stage command is not retried.

With MLflow tracking on, the flow opens a parent run and passes its id to every stage through
``LONGTAIL_PARENT_RUN_ID``, so each stage's run is its child. With the local executor the stages journal their runs
and the flow process writes them into MLflow (:mod:`pipeline.orchestrate.journal_replay`), so no stage imports mlflow.

CLI: ``python -m pipeline.flow run [-S key=value ...] [-t target ...] [--force] [-j N] [--executor local|pool]
[--isolated | --in-workspace] [--name NAME]`` runs once (ephemeral Prefect unless ``PREFECT_API_URL`` is set);
``python -m pipeline.flow serve`` serves the deployment ``longtail-pipeline/longtail`` for the UI;
``python -m pipeline.flow deploy-stage --pool POOL`` registers ``longtail-stage/run-stage`` on a work pool, with
the automations that mark its runs ``Crashed`` when their heartbeats stop or when a worker took one but never
started it. Without Prefect, ``python -m pipeline.orchestrate run`` runs the same graph with the same scheduler.
"""

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pipeline.dvc_locks import clear_stale_locks
from pipeline.flow.pool import (
    CRASH_AFTER_S,
    CRASH_RETRIES,
    HEARTBEAT_S,
    PENDING_AFTER_S,
    POOL_NAME,
    STAGE_DEPLOYMENT,
    check_windows,
    deploy_stage,
    longtail_stage,
    run_graph_on_pool,
)
from pipeline.orchestrate import pool as pool_steps
from pipeline.orchestrate.execution import (
    LOCK_RETRIES,
    LOCK_RETRY_DELAY_S,
    GraphFailedError,
    StageLockError,
    StageStatus,
    run_graph,
    run_stage,
    threads_per_stage,
)
from pipeline.orchestrate.graph import select_stages, stage_graph
from pipeline.orchestrate.journal_replay import JournalReplayer, stage_journal
from pipeline.orchestrate.overrides import apply_overrides
from pipeline.orchestrate.priority import critical_path, read_stage_times, stage_costs
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
Executor = Literal["local", "pool"]
MAX_PARALLEL_LIMIT = 16  # threads of the flow's task runner; the scheduler keeps at most max_parallel in flight
__all__ = ["longtail_pipeline", "longtail_stage", "deploy_stage", "repro_stage", "run_graph_on_pool", "main"]


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
    replayer: JournalReplayer | None = None,
) -> StageStatus:
    """Run ``dvc --wait-for-lock repro --single-item <stage>`` in ``repo_root``, streaming its output to the run log.

    Args:
        stage: stage name (``teacher@r32``).
        repo_root: root of the DVC repository.
        force: pass ``--force`` (run even when up to date).
        parent_run_id: MLflow parent run id exported to the stage as ``LONGTAIL_PARENT_RUN_ID``.
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the stage unless set already; ``None`` leaves them.
        env: extra environment of the stage (:func:`pipeline.orchestrate.workspace.stage_env`).
        replayer: gives this attempt (each retry its own) a fresh MLflow journal and writes the run from it when the
            stage process ended; None: the stage logs to MLflow itself (or not at all, with tracking off).

    Returns:
        'ran' or 'skipped'.

    Raises:
        StageLockError: DVC could not take a lock (the task is retried).
        StageFailedError: the stage failed (not retried).
    """
    with stage_journal(replayer, stage) as journal_dir:
        return run_stage(
            stage,
            repo_root,
            force=force,
            parent_run_id=parent_run_id,
            threads=threads,
            env=env,
            journal_dir=journal_dir,
            log=get_run_logger(),
        )


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
    """The shared scheduler with one ``repro_stage`` task per stage (``wait_for`` draws the edges in the UI).

    With tracking on, the stages' MLflow runs are written here from their journals, and all of them before this
    returns (so before the parent run ends and an isolated worktree is removed).
    """
    threads = threads_per_stage(max_parallel)
    with JournalReplayer(get_run_logger()) if tracking_enabled() else contextlib.nullcontext() as replayer:

        def submit(name: str, upstream: list[PrefectFuture[StageStatus]]) -> PrefectFuture[StageStatus]:
            return repro_stage.submit(name, repo_root, force, parent_run_id, threads, env, replayer, wait_for=upstream)

        order = critical_path(graph, stage_costs(graph, read_stage_times(repo_root)))  # longest remaining path first
        return run_graph(graph, submit, as_completed, max_parallel, order)


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
    crash_retries: Annotated[
        int,
        Field(ge=0, le=10, description="pool: times a stage whose flow run crashed (its worker was lost) is "
              "submitted again; it resumes from its last pushed checkpoint."),
    ] = CRASH_RETRIES,
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
        crash_retries: on the pool, how many times a stage whose flow run crashed (a lost worker) is sent again.

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
        return _drive(graph, root, None, tags, overrides, targets, force, max_parallel, executor, log,
                      crash_retries=crash_retries)

    rev = pin_revision(root)
    exp = experiment_name(name or run_name)
    tags = {"flow_run": run_name, "dvc_exp": exp, "git_rev": rev}
    log.info("Isolated run %s of commit %s with overrides %s", exp, rev[:12], list(overrides) or "none")
    with isolated_worktree(root, rev, exp) as worktree:
        apply_overrides(worktree, list(overrides))
        graph = select_stages(stage_graph(worktree), targets)
        statuses = _drive(graph, root, worktree, tags, overrides, targets, force, max_parallel, executor, log, rev,
                          crash_retries)
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
    crash_retries: int = CRASH_RETRIES,
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
                crash_retries,
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
    run.add_argument("--crash-retries", type=int, default=CRASH_RETRIES,
                     help=f"pool: resubmissions of a stage whose worker was lost (default {CRASH_RETRIES})")
    srv = sub.add_parser("serve", help="serve the deployment for the Prefect UI (needs `prefect server start`)")
    srv.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME})")
    dep = sub.add_parser(
        "deploy-stage", help=f"register {STAGE_DEPLOYMENT} on a process work pool (needs `prefect server start`)"
    )
    dep.add_argument("--pool", default=POOL_NAME, help=f"work pool, created if missing (default {POOL_NAME})")
    # String defaults from the environment go through `type` as a flag would: a bad value is a one-line usage error.
    dep.add_argument("--heartbeat", type=int, default=os.environ.get("LONGTAIL_HEARTBEAT_S", str(HEARTBEAT_S)),
                     help=f"seconds between a stage run's heartbeats (>= 30; default {HEARTBEAT_S})")
    dep.add_argument("--crash-after", type=int, default=os.environ.get("LONGTAIL_CRASH_AFTER_S", str(CRASH_AFTER_S)),
                     help=f"a stage run with no heartbeat for this long is Crashed (default {CRASH_AFTER_S})")
    dep.add_argument("--pending-after", type=int,
                     default=os.environ.get("LONGTAIL_PENDING_AFTER_S", str(PENDING_AFTER_S)),
                     help="a stage run a worker took but did not start (Pending) for this long is Crashed: its worker "
                     f"was lost (>= 10; default {PENDING_AFTER_S}, env LONGTAIL_PENDING_AFTER_S)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.name)
        return 0
    if args.command == "deploy-stage":
        try:
            check_windows(args.heartbeat, args.crash_after, args.pending_after)
        except ValueError as exc:
            dep.error(str(exc))  # one line, before anything is registered
        deployment_id = deploy_stage(args.pool, heartbeat_s=args.heartbeat, crash_after_s=args.crash_after,
                                     pending_after_s=args.pending_after)
        print(f"{STAGE_DEPLOYMENT} on pool {args.pool}: {deployment_id} (heartbeat every {args.heartbeat} s, "
              f"Crashed after {args.crash_after} s without one, or {args.pending_after} s after a worker took it "
              "without starting it)")
        return 0
    try:
        statuses = longtail_pipeline(
            overrides=args.override,
            targets=args.target,
            force=args.force,
            max_parallel=args.max_parallel,
            repo_root=args.repo,
            executor=args.executor,
            isolated=args.isolated,
            name=args.name,
            crash_retries=args.crash_retries,
        )
    except GraphFailedError as exc:
        # One line per failed stage, after Prefect's log of the traceback.
        for stage, error in exc.failures.items():
            line = (str(error).splitlines() or [type(error).__name__])[0]
            print(f"pipeline.flow: {line if line.startswith(f'{stage}:') else f'{stage} failed: {line}'}",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline.flow: interrupted; the stage runs it submitted are cancelled", file=sys.stderr)
        return 130
    width = max((len(n) for n in statuses), default=0)
    for name, status in statuses.items():
        print(f"{name:<{width}}  {status}")
    return 0

