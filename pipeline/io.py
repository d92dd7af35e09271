"""Atomic outputs: a stage writes into a temporary directory that replaces its output directory only when complete.

Temporary names are ``.<name>.tmp<pid>`` (being written) and ``.<name>.old<pid>`` (the previous output, moved aside
during the swap), beside the output. A process killed mid-write leaves them behind; the next write of the same
output removes those of processes that no longer run (and puts a moved-aside previous output back if the swap was
cut short), so an interrupted stage leaves no debris once it has been rerun.

Test hook: ``LONGTAIL_TEST_KILL_AT=<point>`` makes the process send SIGKILL to its own process group (a preempted
worker: the stage, the shell and the ``dvc repro`` that started it) when it reaches ``<point>``. It is read once, at
import; unset (always, outside tests) each point costs one comparison with None. Points:

* ``atomic_dir:start``: the temporary directory exists, still empty;
* ``atomic_dir:full``: the body has written every file into it, before the rename;
* ``atomic_dir:swapped``: the previous output is moved aside, the new one not yet in place;
* ``atomic_dir:done``: the new output is in place, the previous one not yet removed;
* ``write_json:<file name>``: the temporary file is written, before its rename;
* ``checkpoint:load``, ``checkpoint:tmp:<epoch>``, ``checkpoint:saved:<epoch>`` (and ``...:<epoch>.<batch>`` for a
  checkpoint inside an epoch): see ``pipeline.train.checkpoint``;
* ``train:update:<step>``: right after update number ``<step>`` (counted from 1), see ``pipeline.train.trainer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_KILL_AT: str | None = os.environ.get("LONGTAIL_TEST_KILL_AT") or None


def kill_point(point: str, *detail: object) -> None:
    """SIGKILL this process group if ``LONGTAIL_TEST_KILL_AT`` names ``point`` (joined with ``detail`` by ':')."""
    if _KILL_AT is None:
        return
    if ":".join([point, *map(str, detail)]) == _KILL_AT:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(path: str | Path, restore: bool = False) -> list[Path]:
    """Remove the ``.<name>.tmp<pid>`` / ``.<name>.old<pid>`` siblings of ``path`` whose process no longer runs.

    Args:
        path: the output (file or directory) whose leftovers to remove.
        restore: when ``path`` is absent, put a leftover ``.old<pid>`` (a complete previous output moved aside by a
            swap that was cut short) back in its place first.

    Returns:
        The paths removed (or restored).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)(\d+)")
    stale = [(m[1], e) for e in path.parent.iterdir() if (m := pattern.fullmatch(e.name)) and not _pid_alive(int(m[2]))]
    done = []
    for kind, entry in sorted(stale, key=lambda s: s[0] != "old"):  # restore before anything is removed
        if restore and kind == "old" and not path.exists():
            os.replace(entry, path)
            logger.info("restored %s from %s, left by an interrupted write", path, entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(entry)
    if done:
        logger.info("removed %d leftover(s) of an interrupted write of %s", len(done), path)
    return done


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; on success it replaces ``out_dir``.

    On an exception the temporary directory is removed and ``out_dir`` is left as it was (or absent). Leftovers of an
    earlier interrupted call are removed first (see the module docstring).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out, restore=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        kill_point("atomic_dir:start")
        yield tmp
        kill_point("atomic_dir:full")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
        kill_point("atomic_dir:swapped")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # the previous output stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kill_point("atomic_dir:done")
    shutil.rmtree(old, ignore_errors=True)


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write it as null (an empty shot group)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
        kill_point("write_json", path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path, map_location: str | Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never pickled code.

    Raises:
        ValueError: one line naming the file: it holds pickled objects (the refused global is named), or it is not a
            readable torch file (truncated, foreign).
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise ValueError(f"refused to load {path}: it holds pickled objects, not only tensors, and loading them could "
                         f"run code ({detail}); rebuild it with the stage that writes it") from None
    except (RuntimeError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a readable torch file ({reason}); rebuild it with the stage that writes "
                         "it") from None
