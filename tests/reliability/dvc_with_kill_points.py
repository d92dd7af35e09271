"""``dvc`` with kill points inside DVC itself, for the interruption tests (never used outside them).

``python dvc_with_kill_points.py <dvc args>`` runs ``dvc <dvc args>``; with ``LONGTAIL_TEST_DVC_KILL_AT=<point>`` it
sends SIGKILL to its own process group (as a preempted worker: dvc, the shell and the stage command) when DVC reaches
``<point>`` for the stage ``LONGTAIL_TEST_DVC_KILL_STAGE`` (default ``teacher@ce``). The points wrap DVC 3.67.1
internals (``dvc/stage/__init__.py``, ``dvc/stage/run.py``), which the project pins:

* ``cmd_run``: the outputs are removed and the rw-locks taken, before the stage command starts;
* ``save``: the command has ended, before DVC hashes the deps and outputs;
* ``commit``: hashes computed, before the outputs are moved into the cache;
* ``dump``: the outputs are cached, before ``dvc.lock`` is written;
* ``dumped``: ``dvc.lock`` is written, before dvc releases its locks and exits.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import dvc.stage
import dvc.stage.run
from dvc.cli import main

POINT = os.environ.get("LONGTAIL_TEST_DVC_KILL_AT")
STAGE = os.environ.get("LONGTAIL_TEST_DVC_KILL_STAGE", "teacher@ce")


def _kill() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _wrap(owner: object, attr: str, point: str, after: bool = False) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(stage, *args, **kwargs):
        hit = POINT == point and getattr(stage, "addressing", None) == STAGE
        if hit and not after:
            _kill()
        result = original(stage, *args, **kwargs)
        if hit and after:
            _kill()
        return result

    setattr(owner, attr, wrapper)


_wrap(dvc.stage.run, "cmd_run", "cmd_run")  # looked up at call time by run_stage
_wrap(dvc.stage.Stage, "save", "save")
_wrap(dvc.stage.Stage, "commit", "commit")
_wrap(dvc.stage.Stage, "dump", "dump")
_wrap(dvc.stage.Stage, "dump", "dumped", after=True)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
