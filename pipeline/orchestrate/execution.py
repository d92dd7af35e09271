"""Executing the stage graph: one stage as a ``dvc repro`` subprocess, and the scheduler over a whole graph.

One stage runs as

    dvc --wait-for-lock repro --single-item <stage>

in its own process (ECOSYSTEM.md §1.5, the pattern of zincware/paraffin). ``--single-item`` makes DVC reproduce only
that stage, so two stages never walk (and rwlock) a shared upstream stage; the scheduler guarantees the ordering
instead. DVC alone decides what to skip: :func:`parse_status` only reports whether DVC ran the stage or found it up to
date / in its run cache. ``--wait-for-lock`` waits on DVC's repo lock, but the per-path rwlock fails at once, so a
lock failure raises the retriable :class:`StageLockError` and every other failure the final
:class:`StageFailedError`. Before each stage, rwlock entries of dead processes (a killed earlier run) are cleared
(:mod:`pipeline.dvc_locks`).

Each stage gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = CPU count // ``max_parallel`` (unless already set):
torch uses every core by default, so two parallel stages with two threads each would oversubscribe two cores.

With a :class:`~pipeline.orchestrate.journal_replay.JournalReplayer` (tracking on), each attempt of a stage gets a
fresh ``$LONGTAIL_TRACKING_JOURNAL`` directory: the stage journals its MLflow run there instead of importing mlflow,
and the replayer writes the run once the ``dvc repro`` process has ended (:mod:`pipeline.orchestrate.journal_replay`).

:func:`run_graph` is the one scheduler, shared by the Prefect flow and the local runner. It is generic over the kind
of future: the caller says how a stage is submitted and supplies an ``as_completed`` (Prefect's task futures and
``prefect.futures.as_completed``, or a ``ThreadPoolExecutor`` and ``concurrent.futures.as_completed``), so the
scheduling rules cannot drift apart between the two.

No prefect import here: Prefect retries and logging are wrapped around :func:`run_stage` in :mod:`pipeline.flow`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pipeline.dvc_locks import clear_stale_locks
from pipeline.orchestrate.journal_replay import JournalReplayer, stage_journal
from pipeline.orchestrate.priority import record_stage_time
from pipeline.tracking import JOURNAL_ENV, PARENT_RUN_ENV

logger = logging.getLogger(__name__)

StageStatus = Literal["ran", "skipped"]
Log = logging.Logger | logging.LoggerAdapter[Any]

LOCK_RETRIES = 3  # attempts after the first when a stage fails on a DVC lock (the flow's task retries)
LOCK_RETRY_DELAY_S = 5.0
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# DVC 3.67.1 messages (dvc/stage/__init__.py, dvc/stage/cache.py, dvc/lock.py, dvc/rwlock.py).
_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")
_RAN = "Running stage '{}'"
_SKIPPED = ("didn't change, skipping", "is cached - skipping run")
_TAIL_LINES = 20  # lines of the stage's output quoted in an error


class StageLockError(RuntimeError):
    """``dvc repro`` failed on a DVC lock held by another process (retried)."""


class StageFailedError(RuntimeError):
    """``dvc repro`` of a stage failed for another reason (not retried)."""


class GraphFailedError(StageFailedError):
    """One or more stages of a graph failed; the others either completed or were never started.

    Attributes:
        failures: ``{stage: its exception}`` in the order the failures were seen.
        completed: ``{stage: result}`` of the stages that succeeded, in graph order.
        not_run: stages never started, in graph order.
    """

    def __init__(self, failures: dict[str, BaseException], completed: dict[str, Any], not_run: list[str]) -> None:
        self.failures = failures
        self.completed = completed
        self.not_run = not_run
        first = next(iter(failures.values()))
        super().__init__(
            f"Stage(s) {', '.join(failures)} failed; completed: {completed}; not run: {not_run}. First error: {first}"
        )

    def summary(self) -> str:
        """The failure on one line: which stages failed, the first line of the first error, what did not run."""
        first = str(next(iter(self.failures.values()))).strip().splitlines()
        reason = first[0].rstrip(":") if first else "no message"
        return (
            f"stage(s) {', '.join(self.failures)} failed ({reason}); "
            f"completed: {', '.join(self.completed) or 'none'}; not run: {', '.join(self.not_run) or 'none'}"
        )


# --------------------------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------------------------
def parse_status(stage: str, output: str) -> StageStatus:
    """'ran' when DVC executed the stage command, else 'skipped' (unchanged, or restored from the run cache)."""
    return "ran" if _RAN.format(stage) in output else "skipped"


def threads_per_stage(max_parallel: int) -> int:
    """Intra-op threads for each of ``max_parallel`` concurrent stages: the CPUs shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, max_parallel))


def _dvc_env(
    parent_run_id: str | None,
    threads: int | None = None,
    extra: Mapping[str, str] | None = None,
    journal_dir: str | None = None,
) -> dict[str, str]:
    """The environment of a stage process: ours, analytics off, the MLflow parent run, the thread budget.

    Args:
        parent_run_id: exported as ``LONGTAIL_PARENT_RUN_ID``; ``None`` removes an inherited one (no parent).
        threads: value for ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` where they are not set already (a user's
            explicit setting wins); ``None`` leaves them alone.
        extra: variables set last (an isolated run's ``PYTHONPATH``, MLflow store and run tags).
        journal_dir: exported as ``LONGTAIL_TRACKING_JOURNAL``; ``None`` removes an inherited one (the stage logs to
            MLflow itself: a journal nobody replays would be lost).
    """
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")  # stage output reaches the log line by line, not in pipe-buffer chunks
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    else:
        env.pop(PARENT_RUN_ENV, None)
    if threads is not None:
        for var in THREAD_ENV_VARS:
            env.setdefault(var, str(threads))
    env.update(extra or {})
    if journal_dir:
        env[JOURNAL_ENV] = journal_dir
    else:
        env.pop(JOURNAL_ENV, None)
    return env


def run_stage(
    stage: str,
    repo_root: str | os.PathLike[str],
    *,
    force: bool = False,
    parent_run_id: str | None = None,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    pull: bool = False,
    journal_dir: str | None = None,
    log: Log = logger,
) -> StageStatus:
    """Run ``dvc --wait-for-lock repro --single-item <stage>`` in ``repo_root``, streaming its output to ``log``.

    Every output line is logged with a ``[stage] `` prefix so that the logs of parallel stages can be told apart
    (DVC's own "Running stage ..." lines included); so are the start and the end, with the elapsed time.

    Args:
        stage: stage name (``teacher@r32``).
        repo_root: root of the DVC repository.
        force: pass ``--force`` (run even when up to date).
        parent_run_id: MLflow parent run id exported to the stage as ``LONGTAIL_PARENT_RUN_ID``.
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the stage unless set already (:func:`threads_per_stage`).
        pull: pass ``--pull`` (missing outputs of an unchanged stage, and the run cache, from the DVC remote).
        env: extra environment variables of the stage process (:func:`pipeline.orchestrate.workspace.stage_env`).
        journal_dir: a fresh directory where the stage journals its MLflow run (``LONGTAIL_TRACKING_JOURNAL``), for
            the caller to replay once this returns or raises
            (:meth:`pipeline.orchestrate.journal_replay.JournalReplayer.attempt`); None: the stage logs to MLflow.
        log: where output and progress go (the flow passes Prefect's run logger).

    Returns:
        'ran' or 'skipped'.

    Raises:
        StageLockError: DVC could not take a lock (retry it).
        StageFailedError: the stage failed (do not retry).
    """
    root = os.fspath(Path(repo_root))
    for msg in clear_stale_locks(root):
        log.warning("[%s] cleared stale DVC lock: %s", stage, msg)
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    if force:
        cmd.append("--force")
    if pull:
        cmd.append("--pull")
    log.info("[%s] started: %s", stage, " ".join(cmd[2:]))
    started = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=root,
        env=_dvc_env(parent_run_id, threads, env, journal_dir),
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
                log.info("[%s] %s", stage, line)
        returncode = proc.wait()
    elapsed = time.perf_counter() - started
    output = "\n".join(lines)
    if returncode != 0:
        tail = "\n".join(lines[-_TAIL_LINES:])
        if any(marker in output for marker in _LOCK_ERRORS):
            log.warning("[%s] hit a DVC lock after %.1f s", stage, elapsed)
            raise StageLockError(f"dvc repro {stage} hit a DVC lock (exit {returncode}); retrying:\n{tail}")
        log.error("[%s] failed (exit %d) after %.1f s", stage, returncode, elapsed)
        raise StageFailedError(f"dvc repro {stage} failed with exit code {returncode}:\n{tail}")
    status = parse_status(stage, output)
    log.info("[%s] %s in %.1f s", stage, status, elapsed)
    if status == "ran":
        record_stage_time(root, stage, elapsed)  # the next run's scheduling priority (pipeline.orchestrate.priority)
    return status


def run_stage_retrying(
    stage: str,
    repo_root: str | os.PathLike[str],
    *,
    retries: int = LOCK_RETRIES,
    delay_s: float = LOCK_RETRY_DELAY_S,
    replayer: JournalReplayer | None = None,
    log: Log = logger,
    **kwargs: Any,
) -> StageStatus:
    """:func:`run_stage`, retried on :class:`StageLockError` only (what the flow's task does through Prefect).

    Args:
        stage: stage name.
        repo_root: root of the DVC repository.
        retries: attempts after the first.
        delay_s: seconds between attempts.
        replayer: gives each attempt a fresh MLflow journal and replays it when the attempt ended; None: the stage
            logs to MLflow itself (or not at all, with tracking off).
        log: as in :func:`run_stage`.
        **kwargs: forwarded to :func:`run_stage` (force, parent_run_id, threads, env).
    """
    for attempt in range(retries + 1):
        try:
            with stage_journal(replayer, stage) as journal_dir:
                return run_stage(stage, repo_root, log=log, journal_dir=journal_dir, **kwargs)
        except StageLockError:
            if attempt == retries:
                raise
            log.warning("[%s] retry %d/%d in %.0f s", stage, attempt + 1, retries, delay_s)
            time.sleep(delay_s)
    raise AssertionError("unreachable")  # the loop returns or raises


# --------------------------------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------------------------------
class StageFuture(Protocol):
    """What :func:`run_graph` needs of a future (``concurrent.futures.Future``, ``prefect.futures.PrefectFuture``)."""

    def result(self) -> Any: ...


F = TypeVar("F", bound=StageFuture)


def _check_graph(graph: Mapping[str, Sequence[str]], max_parallel: int) -> None:
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
    for name, ups in graph.items():
        unknown = [up for up in ups if up not in graph]
        if unknown:
            raise ValueError(
                f"Stage {name!r} depends on {unknown}, which are not in the graph; select the graph with "
                "pipeline.orchestrate.graph.select_stages (it adds everything upstream)"
            )


def run_graph(
    graph: Mapping[str, Sequence[str]],
    submit: Callable[[str, list[F]], F],
    as_completed: Callable[[list[F]], Iterable[F]],
    max_parallel: int,
    priority: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every stage of ``graph`` once all its upstream stages succeeded, at most ``max_parallel`` at a time.

    Among ready stages the one earlier in ``priority`` starts first (:func:`pipeline.orchestrate.priority.
    critical_path`: the longest remaining path first); by default, the order of ``graph`` (topological, upstream
    first, as :func:`stage_graph` gives it). On a failure no new stage starts; the running ones finish;
    then :class:`GraphFailedError` is raised, naming the failures, the completed stages and those never started.

    Args:
        graph: ``{stage: upstream stages}``; every upstream stage must be in the graph.
        submit: starts a stage, ``submit(name, upstream_futures)``, and returns its future (all upstream futures
            have succeeded by then; Prefect uses them as ``wait_for`` to draw the dependency).
        as_completed: yields the given futures as they finish (``prefect.futures.as_completed``,
            ``concurrent.futures.as_completed``); only its first item is taken per call.
        max_parallel: most stages in flight at once.
        priority: every stage of ``graph``, in the order ready stages should start (default: graph order).

    Returns:
        ``{stage: future.result()}`` in graph order.

    Raises:
        GraphFailedError: a stage's future raised.
        ValueError: ``max_parallel < 1``, an upstream stage missing from the graph, or a cycle.
    """
    _check_graph(graph, max_parallel)
    order = list(graph)
    if priority is not None and sorted(priority) != sorted(order):
        raise ValueError("priority must list every stage of the graph once")
    start_order = list(priority) if priority is not None else order
    done: dict[str, Any] = {}
    futures: dict[str, F] = {}
    running: dict[F, str] = {}
    failures: dict[str, BaseException] = {}
    while True:
        if not failures:
            for name in start_order:
                if len(running) >= max_parallel:
                    break
                if name in futures or any(up not in done for up in graph[name]):
                    continue
                fut = submit(name, [futures[up] for up in graph[name]])
                futures[name] = fut
                running[fut] = name
        if not running:
            break
        fut = next(iter(as_completed(list(running))))
        name = running.pop(fut)
        try:
            done[name] = fut.result()
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            failures[name] = exc
    if failures:
        not_run = [n for n in order if n not in done and n not in failures]
        raise GraphFailedError(failures, {n: done[n] for n in order if n in done}, not_run) from next(
            iter(failures.values())
        )
    if len(done) < len(order):
        stuck = [n for n in order if n not in done]
        raise ValueError(f"Stages {stuck} never became ready: the graph has a cycle")
    return {name: done[name] for name in order}
