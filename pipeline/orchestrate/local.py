"""The Prefect-free local runner: ``python -m pipeline.orchestrate run [-t target ...] [-f] [-j N]``.

``dvc repro`` runs stages one at a time; the Prefect flow runs them in parallel but needs a Prefect server (or seconds
of ephemeral start-up per run). This runner sits in between: it reads the same stage graph, runs it with the same
scheduler and the same stage execution as the flow (:mod:`pipeline.orchestrate.execution`), on a
``concurrent.futures.ThreadPoolExecutor``, and prints to the terminal. The threads only wait on ``dvc``
subprocesses, so threads are enough (ECOSYSTEM.md §2.1).

Before any process starts, one pass over the graph in this process asks DVC which stages changed
(:func:`pipeline.orchestrate.graph.stages_to_run`): a stage that is up to date, with every upstream stage up to date,
is reported ``skipped`` without a ``dvc repro`` process (a process costs about a second of start-up), so a run with
nothing to do costs about what a no-op ``dvc repro`` does (benchmarks/README.md).

Every output line of a stage is prefixed with ``[stage] ``, its start and end are printed with the elapsed time, and
the run ends with one ``name  ran|skipped`` line per stage and a summary. Among ready stages, the one with the longest
remaining path through the graph starts first (:mod:`pipeline.orchestrate.priority`, from the stage times of earlier
runs). A failed stage makes the runner start
nothing new, let the running stages finish, print a one-line error on stderr and exit with status 1.

With MLflow tracking on (:func:`pipeline.tracking.tracking_enabled`), the store is created once before stages start
in parallel (concurrent first use corrupts it, ECOSYSTEM.md §4); unlike the flow, no parent run is opened, so each
stage's run is a top-level run. The stages do not import mlflow: each journals its run, and one background thread of
this process writes the runs into MLflow as the stages end (:mod:`pipeline.orchestrate.journal_replay`); the runner
returns once they are written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from pipeline.dvc_locks import clear_stale_locks
from pipeline.orchestrate.execution import (
    GraphFailedError,
    Log,
    StageStatus,
    run_graph,
    run_stage_retrying,
    threads_per_stage,
)
from pipeline.orchestrate.graph import select_stages, stage_graph, stages_to_run
from pipeline.orchestrate.journal_replay import JournalReplayer
from pipeline.orchestrate.priority import critical_path, read_stage_times, stage_costs
from pipeline.tracking import find_repo_root, init_store, tracking_enabled

logger = logging.getLogger(__name__)

DEFAULT_MAX_PARALLEL = 2  # = the flow's default: two cores here


def run_local(
    repo_root: str | os.PathLike[str],
    *,
    targets: Iterable[str] = (),
    force: bool = False,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    log: Log = logger,
) -> dict[str, StageStatus]:
    """Reproduce the DVC pipeline (or ``targets``) stage by stage, independent stages in parallel, without Prefect.

    Args:
        repo_root: root of the DVC repository.
        targets: stages (or ``foreach`` groups such as ``teacher``) to reproduce, with everything upstream; empty = all.
        force: run the selected stages even when DVC finds them up to date.
        max_parallel: most stages running at once; each gets CPU count // ``max_parallel`` threads.
        log: where stage output and progress go.

    Returns:
        ``{stage: 'ran' | 'skipped'}`` in execution order.

    Raises:
        GraphFailedError: a stage failed (after lock retries).
        ValueError: an unknown target, or ``max_parallel < 1``.
    """
    root = os.fspath(Path(repo_root).resolve())
    for msg in clear_stale_locks(root):
        log.warning("Cleared stale DVC lock: %s", msg)
    if force:
        graph, run = select_stages(stage_graph(root), targets), None
    else:
        graph, run = stages_to_run(root, targets)
    run = set(graph) if run is None else run
    up_to_date = [name for name in graph if name not in run]
    log.info("%d stage(s) to check: %s", len(graph), ", ".join(graph))
    if up_to_date:
        log.info("%d stage(s) up to date, skipped without a dvc process: %s", len(up_to_date), ", ".join(up_to_date))
    # The stages to run, with only their upstream stages that run too (the others are done already).
    to_run = {name: [up for up in ups if up in run] for name, ups in graph.items() if name in run}
    tracked = bool(to_run) and tracking_enabled()
    threads = threads_per_stage(max_parallel)
    skipped: dict[str, StageStatus] = dict.fromkeys(up_to_date, "skipped")
    # Left last: the stages' MLflow runs are all written before this returns (or raises).
    with (
        # The store is created once, on the replay thread, before the first journal (ECOSYSTEM.md §4: concurrent
        # first use corrupts it); the stages write journals and never open it, so they need not wait for it.
        JournalReplayer(log, setup=lambda: init_store(root)) if tracked else contextlib.nullcontext() as replayer,
        concurrent.futures.ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="stage") as pool,
    ):

        def submit(name: str, upstream: list[concurrent.futures.Future[StageStatus]]) -> concurrent.futures.Future:
            # Upstream futures have all succeeded when the scheduler submits; nothing to wait for here.
            return pool.submit(run_stage_retrying, name, root, force=force, threads=threads, replayer=replayer,
                               log=log)

        try:
            order = critical_path(to_run, stage_costs(to_run, read_stage_times(root)))  # longest remaining path first
            ran = run_graph(to_run, submit, concurrent.futures.as_completed, max_parallel, order) if to_run else {}
        except GraphFailedError as exc:
            exc.completed = {n: {**skipped, **exc.completed}[n] for n in graph if n in skipped or n in exc.completed}
            raise
    return {name: {**skipped, **ran}[name] for name in graph}


@contextlib.contextmanager
def _stdout_log() -> Iterator[logging.Logger]:
    """A logger that prints bare messages to the current ``sys.stdout`` (stage output already carries its prefix)."""
    out = logging.getLogger(f"{__name__}.console")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    out.addHandler(handler)
    out.setLevel(logging.INFO)
    out.propagate = False  # printed once, not again by the root logger
    try:
        yield out
    finally:
        out.removeHandler(handler)


def _print_statuses(statuses: Mapping[str, str]) -> None:
    width = max((len(n) for n in statuses), default=0)
    for name, status in statuses.items():
        print(f"{name:<{width}}  {status}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m pipeline.orchestrate run``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.orchestrate",
        description="Run the DVC pipeline stage by stage, independent stages in parallel (no Prefect).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reproduce the pipeline of the repository at the working directory")
    run.add_argument("-t", "--target", action="append", default=[], help="stage or group to reproduce (repeatable)")
    run.add_argument("-f", "--force", action="store_true", help="run stages even when up to date")
    run.add_argument(
        "-j",
        "--max-parallel",
        type=_positive_int,
        default=DEFAULT_MAX_PARALLEL,
        help=f"stages running at once (default {DEFAULT_MAX_PARALLEL})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # library logs → stderr
    started = time.perf_counter()
    with _stdout_log() as out:
        try:
            statuses: dict[str, str] = dict(
                run_local(
                    find_repo_root(Path.cwd()),
                    targets=args.target,
                    force=args.force,
                    max_parallel=args.max_parallel,
                    log=out,
                )
            )
        except GraphFailedError as exc:
            statuses = {**exc.completed, **dict.fromkeys(exc.failures, "failed")}
            statuses.update(dict.fromkeys(exc.not_run, "not run"))
            error = exc.summary()
        except ValueError as exc:  # an unknown target
            print(f"error: {exc}", file=sys.stderr)
            return 2
        else:
            error = None
    _print_statuses(statuses)
    counts = {s: sum(v == s for v in statuses.values()) for s in ("ran", "skipped", "failed", "not run")}
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("ran", "skipped"))
    print(f"{len(statuses)} stage(s) in {time.perf_counter() - started:.1f} s: {parts}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
