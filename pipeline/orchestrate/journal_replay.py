"""MLflow runs of the stages a runner drives, written by the runner: stages journal, one thread here replays.

A stage process that logs to MLflow itself spends ~2.3 s of CPU importing mlflow and opening its SQLite store before
its first training step, and ~0.3 s logging at the end (74 stages in a three-seed run). When tracking is on, the
local runner and the Prefect flow's local executor give every stage execution a fresh journal directory instead
(``$LONGTAIL_TRACKING_JOURNAL``, :class:`pipeline.tracking.JournalTracker`); when its ``dvc repro`` process has ended
(succeeded, failed, or hit a lock), the journal goes to :class:`JournalReplayer`'s single background thread, which
writes the run into MLflow (:func:`pipeline.tracking.replay_journal`) in the order the stages ended, while the freed
slot already runs the next stage. The runner waits for the replays before it returns.

A retried attempt (a DVC lock error) gets its own directory, so a journal is never replayed twice. A replay failure is
a warning (the journal is kept and named), never a stage failure. ``dvc repro`` by hand and the pool's workers set no
journal: their stages log to MLflow directly. No mlflow import here (:mod:`pipeline.tracking` imports it lazily).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from pipeline.tracking import journal_has_records, replay_journal

logger = logging.getLogger(__name__)

Log = logging.Logger | logging.LoggerAdapter[Any]


class JournalReplayer:
    """One background thread that replays stage journals into MLflow, first handed over, first replayed.

    Use it as a context manager around the stages: leaving it waits until every journal handed over is replayed.

    Args:
        log: where the replay's progress goes (the runner's log).
        setup: run first on the replay thread, before any journal (the runner creates the MLflow store there: no
            stage opens it, so its 1-4 s no longer delay the first stage). Its failure is a warning.
    """

    def __init__(self, log: Log = logger, setup: Callable[[], object] | None = None) -> None:
        self._log = log
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-replay")
        self._pending: list[concurrent.futures.Future[Any]] = []
        if setup is not None:
            self._pending.append(self._pool.submit(self._setup, setup))

    def _setup(self, setup: Callable[[], object]) -> None:
        try:
            setup()
        except Exception as exc:  # noqa: BLE001 - a tracking copy must never fail the pipeline
            self._log.warning("could not prepare the MLflow store (%s: %s); the replays will try again",
                              type(exc).__name__, exc)

    @contextlib.contextmanager
    def attempt(self, stage: str) -> Iterator[str]:
        """A fresh journal directory for one attempt of ``stage``, handed to :meth:`submit` when the block ends."""
        journal = tempfile.mkdtemp(prefix=f"longtail-journal-{re.sub(r'[^A-Za-z0-9_.@-]', '_', stage)}-")
        try:
            yield journal
        finally:
            self.submit(stage, journal)

    def submit(self, stage: str, journal: str) -> None:
        """Queue the replay of ``journal`` (a stage that logged nothing: its empty directory is removed)."""
        if not journal_has_records(journal):
            shutil.rmtree(journal, ignore_errors=True)
            return
        self._pending.append(self._pool.submit(self._replay, stage, journal))

    def _replay(self, stage: str, journal: str) -> str | None:
        started = time.perf_counter()
        try:
            run_id = replay_journal(journal)  # logs its own warning on a failure, never raises
        except Exception as exc:  # noqa: BLE001 - a tracking copy must never fail the pipeline
            self._log.warning("[%s] could not replay its MLflow run from %s (%s: %s)", stage, journal,
                              type(exc).__name__, exc)
            return None
        if run_id is not None:
            self._log.info("[%s] MLflow run %s written in %.1f s", stage, run_id, time.perf_counter() - started)
        return run_id

    def close(self) -> None:
        """Wait until every journal handed over is replayed, then stop the thread."""
        left = sum(not f.done() for f in self._pending)
        if left:
            self._log.info("Waiting for %d MLflow run(s) to be written from their stage journals", left)
        self._pool.shutdown(wait=True)

    def __enter__(self) -> JournalReplayer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()
        return False


def stage_journal(replayer: JournalReplayer | None, stage: str) -> contextlib.AbstractContextManager[str | None]:
    """``replayer.attempt(stage)``, or a block with no journal (None) when there is no replayer (tracking off)."""
    return replayer.attempt(stage) if replayer is not None else contextlib.nullcontext()
