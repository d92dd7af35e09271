"""The Prefect flow over ``dvc.yaml`` (the only module that imports prefect).

The DAG is defined once, in ``dvc.yaml``. The flow reads DVC's resolved stage graph (``foreach``/``matrix`` expanded)
from ``dvc.repo.Repo(root).index.graph`` (an internal API: dvc is pinned to 3.67.1 and ``tests/pipeline/test_flow.py``
guards it against ``dvc stage list``), then submits one task per stage that runs

    dvc --wait-for-lock repro --single-item <stage>

once all its upstream tasks succeeded, at most ``max_parallel`` at a time, so independent stages (teachers, index
builds) run concurrently (ECOSYSTEM.md §3.2, the pattern of zincware/paraffin). DVC alone decides what to skip:
tasks use Prefect's ``NO_CACHE`` and report whether DVC ran the stage or found it up to date / in its run cache.
``--wait-for-lock`` waits on DVC's repo lock; the per-path rwlock fails at once, so a task retries on lock errors
(and only on them: a failing stage command is not retried). Before each stage, rwlock entries of dead processes
(a killed earlier run) are cleared (:mod:`pipeline.dvc_locks`).

Config overrides use the Hydra override grammar and are applied exactly as ``dvc exp run -S`` applies them (DVC's own
``dvc.utils.hydra.compose_and_dump`` when ``hydra.enabled`` is set in the DVC config, else ``apply_overrides`` on the
params file), then the stages run in the workspace (no experiment ref is created).

With MLflow tracking on, the flow opens a parent run and passes its id to every stage through
``LONGTAIL_PARENT_RUN_ID``, so each stage's run is its child.

CLI: ``python -m pipeline.flow run [-S key=value ...] [-t target ...] [--force] [-j N]`` runs once (ephemeral
Prefect); ``python -m pipeline.flow serve`` serves the deployment ``longtail-pipeline/longtail`` for the UI.
"""

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pipeline.dvc_locks import clear_stale_locks
from pipeline.tracking import PARENT_RUN_ENV, create_tracker, find_repo_root, init_store, tracking_enabled

logger = logging.getLogger(__name__)

FLOW_NAME = "longtail-pipeline"
DEPLOYMENT_NAME = "longtail"
MAX_PARALLEL_LIMIT = 16  # threads of the flow's task runner; the flow itself keeps at most max_parallel in flight
StageStatus = Literal["ran", "skipped"]

# DVC 3.67.1 messages (dvc/stage/__init__.py, dvc/stage/cache.py, dvc/lock.py, dvc/rwlock.py).
_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")
_RAN = "Running stage '{}'"
_SKIPPED = ("didn't change, skipping", "is cached - skipping run")


class StageLockError(RuntimeError):
    """``dvc repro`` failed on a DVC lock held by another process (retried)."""


class StageFailedError(RuntimeError):
    """``dvc repro`` of a stage failed for another reason (not retried)."""


# --------------------------------------------------------------------------------------------------------------------
# The stage graph and params
# --------------------------------------------------------------------------------------------------------------------
def _stage_name(stage: Any) -> str:
    """DVC's ``stage.addressing`` as seen from the repo root (``addressing`` itself is relative to the CWD)."""
    path = stage.path_in_repo.replace(os.sep, "/")
    return stage.name if path == "dvc.yaml" else f"{path}:{stage.name}"


def stage_graph(repo_root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Every pipeline stage of the DVC repo → the stages it depends on directly (``foreach``/``matrix`` expanded).

    Nodes without a ``cmd`` (``.dvc`` files of imported data) are dropped. In DVC's graph an edge u→v means
    "u depends on v" (ECOSYSTEM.md §1.6).

    Args:
        repo_root: root of the DVC repository.

    Returns:
        ``{stage name (DVC's addressing from the repo root): sorted upstream stage names}``, upstream first.
    """
    import networkx as nx
    from dvc.repo import Repo

    with Repo(os.fspath(repo_root)) as repo:
        graph = repo.index.graph
        stages = [s for s in graph.nodes if getattr(s, "cmd", None)]
        upstream = {
            _stage_name(s): sorted(_stage_name(u) for u in graph.successors(s) if getattr(u, "cmd", None))
            for s in stages
        }
        # Upstream first; ties broken by name so runs are reproducible.
        order = [_stage_name(s) for s in nx.lexicographical_topological_sort(graph.reverse(copy=True), key=_stage_name)]
    return {name: upstream[name] for name in order if name in upstream}


def select_stages(graph: dict[str, list[str]], targets: Iterable[str]) -> dict[str, list[str]]:
    """Restrict ``graph`` to ``targets`` and everything upstream of them (all stages when ``targets`` is empty).

    A target is a stage name (``teacher@r32``) or a ``foreach``/``matrix`` group (``teacher`` = every ``teacher@*``).

    Raises:
        ValueError: a target names no stage; the message lists the valid names.
    """
    targets = list(targets)
    if not targets:
        return dict(graph)
    wanted: set[str] = set()
    for target in targets:
        matched = [name for name in graph if name == target or name.split("@", 1)[0] == target]
        if not matched:
            raise ValueError(f"Unknown target {target!r}; valid stages: {', '.join(graph)}")
        wanted.update(matched)
    todo = list(wanted)
    while todo:
        for up in graph[todo.pop()]:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)
    return {name: ups for name, ups in graph.items() if name in wanted}


def apply_overrides(repo_root: str | os.PathLike[str], overrides: list[str]) -> None:
    """Apply Hydra-grammar overrides to the params files the way ``dvc exp run -S`` does (DVC 3.67.1
    ``dvc/repo/experiments/queue/base.py::_update_params``).

    With ``hydra.enabled`` in the DVC config, ``params.yaml`` is recomposed from ``conf/`` (``hydra.config_dir``,
    ``hydra.config_name``) plus the overrides and overwritten; other files (``file.yaml:key=value``), or all files
    when Hydra is off, get the overrides applied in place. Does nothing when ``overrides`` is empty.

    Raises:
        ValueError: a sweep override (``lr=0.1,0.2``), which ``dvc exp run`` accepts only with ``--queue``.
    """
    if not overrides:
        return
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides
    from dvc.utils.hydra import compose_and_dump, to_hydra_overrides

    root = Path(repo_root).resolve()
    path_overrides = to_path_overrides(overrides)
    sweeps = [x for ovs in path_overrides.values() for x in to_hydra_overrides(ovs) if x.is_sweep_override()]
    if sweeps:
        raise ValueError(
            f"Sweep overrides {[str(x.input_line) for x in sweeps]} are not supported by the flow; run one value per "
            "flow run, or use `dvc exp run --queue -S ...` + `dvc queue start`"
        )
    with Repo(os.fspath(root)) as repo:
        hydra_config = repo.config.get("hydra", {})
    hydra_enabled = bool(hydra_config.get("enabled", False))
    for path, ovs in path_overrides.items():
        target = root / path
        if hydra_enabled and path == ParamsDependency.DEFAULT_PARAMS_FILE:
            config_module = hydra_config.get("config_module")
            config_dir = None if config_module else os.fspath(root / hydra_config.get("config_dir", "conf"))
            compose_and_dump(
                target,
                config_dir,
                config_module,
                hydra_config.get("config_name", "config"),
                os.fspath(root / hydra_config.get("plugins_path", "")),
                ovs,
            )
            logger.info("Composed %s from %s with %s", target, config_dir or config_module, ovs)
        else:
            dvc_apply_overrides(target, ovs)
            logger.info("Applied %s to %s", ovs, target)


# --------------------------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------------------------
def parse_status(stage: str, output: str) -> StageStatus:
    """'ran' when DVC executed the stage command, else 'skipped' (unchanged, or restored from the run cache)."""
    return "ran" if _RAN.format(stage) in output else "skipped"


def _retry_on_lock_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the stage failed on a DVC lock."""
    try:
        state.result()
    except StageLockError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


def _dvc_env(parent_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    else:
        env.pop(PARENT_RUN_ENV, None)
    return env


@task(
    cache_policy=NO_CACHE,  # DVC's dvc.lock and run cache alone decide what to skip
    retries=3,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_on_lock_error,
    task_run_name="dvc:{stage}",
)
def repro_stage(stage: str, repo_root: str, force: bool = False, parent_run_id: str | None = None) -> StageStatus:
    """Run ``dvc --wait-for-lock repro --single-item <stage>`` in ``repo_root``, streaming its output to the log.

    Args:
        stage: stage name (``teacher@r32``).
        repo_root: root of the DVC repository.
        force: pass ``--force`` (run even when up to date).
        parent_run_id: MLflow parent run id exported to the stage as ``LONGTAIL_PARENT_RUN_ID``.

    Returns:
        'ran' or 'skipped'.

    Raises:
        StageLockError: DVC could not take a lock (the task is retried).
        StageFailedError: the stage failed (not retried).
    """
    log = get_run_logger()
    for msg in clear_stale_locks(repo_root):
        log.warning("Cleared stale DVC lock: %s", msg)
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    log.info("$ %s", " ".join(cmd[2:]))
    started = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=repo_root,
        env=_dvc_env(parent_run_id),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            if line:
                log.info("%s", line)
        returncode = proc.wait()
    output = "\n".join(lines)
    if returncode != 0:
        tail = "\n".join(lines[-20:])
        if any(marker in output for marker in _LOCK_ERRORS):
            raise StageLockError(f"dvc repro {stage} hit a DVC lock (exit {returncode}); retrying:\n{tail}")
        raise StageFailedError(f"dvc repro {stage} failed with exit code {returncode}:\n{tail}")
    status = parse_status(stage, output)
    log.info("Stage %s %s in %.1f s", stage, status, time.perf_counter() - started)
    return status


# --------------------------------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------------------------------
def _run_graph(
    graph: dict[str, list[str]], repo_root: str, force: bool, max_parallel: int, parent_run_id: str | None
) -> dict[str, StageStatus]:
    """Submit each stage once all its upstream stages succeeded, keeping at most ``max_parallel`` in flight.

    On a failure no new stage starts; running ones finish; then the first error is raised.
    """
    order = list(graph)  # topological, upstream first
    done: dict[str, StageStatus] = {}
    futures: dict[str, PrefectFuture[StageStatus]] = {}
    running: dict[PrefectFuture[StageStatus], str] = {}
    failures: dict[str, BaseException] = {}
    while True:
        if not failures:
            for name in order:
                if len(running) >= max_parallel:
                    break
                if name in futures or any(up not in done for up in graph[name]):
                    continue
                fut = repro_stage.submit(
                    name, repo_root, force, parent_run_id, wait_for=[futures[up] for up in graph[name]]
                )
                futures[name] = fut
                running[fut] = name
        if not running:
            break
        fut = next(as_completed(list(running)))
        name = running.pop(fut)
        try:
            done[name] = fut.result()
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            failures[name] = exc
    if failures:
        not_run = [n for n in order if n not in done and n not in failures]
        name, exc = next(iter(failures.items()))
        raise StageFailedError(
            f"Stage(s) {', '.join(failures)} failed; completed: {done}; not run: {not_run}. First error: {exc}"
        ) from exc
    return {name: done[name] for name in order}


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
