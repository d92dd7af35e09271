"""Recover from DVC locks left behind by a killed ``dvc repro``.

DVC 3.67.1 keeps two locks under ``.dvc/tmp`` (ECOSYSTEM.md §1.5; source ``dvc/rwlock.py``, ``dvc/lock.py``):

* ``rwlock``: JSON ``{"read": {path: [{"pid", "cmd"}, ...]}, "write": {path: {"pid", "cmd"}}}`` naming the processes
  that read/write each output path, edited under the guard ``rwlock.lock``. A process killed with SIGKILL never
  releases its entries. DVC drops entries of PIDs that ``psutil.pid_exists`` says are gone, but a killed process that
  its parent has not reaped yet (a zombie) still "exists", and the next ``dvc repro`` fails at once with
  "'<path>' is busy, it is being blocked by: (PID ...)". :func:`clear_stale_locks` drops entries whose process is
  gone or a zombie.
* ``lock``: the repo lock, a ``zc.lockfile`` file. It is held through ``flock`` on an open descriptor, which the
  kernel releases when the process dies, so a leftover *file* blocks nobody. We only probe it and report a live
  holder; we never delete it (DVC reuses the file).

Usage: ``python -m pipeline.dvc_locks [REPO_ROOT]`` prints what was cleared.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RWLOCK_FILE = "rwlock"  # = dvc.rwlock.RWLOCK_FILE
RWLOCK_GUARD = "rwlock.lock"  # = dvc.rwlock.RWLOCK_LOCK
REPO_LOCK = "lock"  # dvc.repo.Repo.lock → <tmp_dir>/lock


def pid_alive(pid: int) -> bool:
    """True when ``pid`` names a running process (not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    # A zombie still answers signal 0; /proc tells it apart (state 'Z'). Without /proc, assume alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    state = stat.rpartition(")")[2].split()[0:1]  # the comm field may contain spaces: split after its ')'
    return state != ["Z"]


@contextlib.contextmanager
def _guard(path: Path, timeout: float = 10.0) -> Iterator[None]:
    """Hold DVC's ``rwlock.lock`` guard (a zc.lockfile = non-blocking ``flock``) while editing ``rwlock``."""
    deadline = time.monotonic() + timeout
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise TimeoutError(f"Could not acquire {path} within {timeout} s") from exc
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _drop_dead(lock: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove entries of dead PIDs from a parsed rwlock; returns the new lock and one message per dropped entry."""
    cleared: list[str] = []
    new: dict[str, Any] = {}
    for path, info in (lock.get("write") or {}).items():
        if pid_alive(int(info["pid"])):
            new.setdefault("write", {})[path] = info
        else:
            cleared.append(f"write lock on '{path}' held by dead PID {info['pid']} ({info.get('cmd', '?')})")
    for path, infos in (lock.get("read") or {}).items():
        alive = []
        for info in infos:
            if pid_alive(int(info["pid"])):
                alive.append(info)
            else:
                cleared.append(f"read lock on '{path}' held by dead PID {info['pid']} ({info.get('cmd', '?')})")
        if alive:
            new.setdefault("read", {})[path] = alive
    return new, cleared


def _atomic_write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def repo_lock_holder(tmp_dir: Path) -> int | None:
    """PID holding DVC's repo lock ``<tmp_dir>/lock`` right now, or None when nobody holds it.

    Probes with a non-blocking ``flock`` (what zc.lockfile takes), then releases it at once.
    """
    path = tmp_dir / REPO_LOCK
    if not path.exists():
        return None
    try:
        fh = open(path, "r+")
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            text = fh.read().strip()  # zc.lockfile writes " <pid>\n"
            try:
                return int(text.split()[0])
            except (ValueError, IndexError):
                return -1
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None


def clear_stale_locks(repo_root: str | os.PathLike[str]) -> list[str]:
    """Drop the rwlock entries of dead processes in ``<repo_root>/.dvc/tmp``; remove the file when nothing is left.

    Safe while other DVC processes run: the rwlock is edited under DVC's own guard and only entries of dead PIDs go.

    Args:
        repo_root: root of the DVC repository.

    Returns:
        One message per cleared entry (empty when nothing was stale).
    """
    tmp_dir = Path(repo_root) / ".dvc" / "tmp"
    path = tmp_dir / RWLOCK_FILE
    if not path.exists():
        cleared: list[str] = []
    else:
        with _guard(tmp_dir / RWLOCK_GUARD):
            try:
                lock = json.loads(path.read_text(encoding="utf-8") or "{}")
            except FileNotFoundError:
                lock = {}
            except json.JSONDecodeError:
                # DVC itself would refuse to run ("JSON structure is corrupted"); a half-written rwlock is stale.
                path.unlink()
                lock, cleared = {}, [f"removed corrupted {path}"]
            else:
                lock, cleared = _drop_dead(lock)
                if cleared:
                    if lock:
                        _atomic_write_json(path, lock)
                    else:
                        path.unlink()
    for msg in cleared:
        logger.warning("Cleared stale DVC lock: %s", msg)
    holder = repo_lock_holder(tmp_dir)
    if holder is not None:
        logger.info("DVC repo lock %s is held by live PID %s (not stale; left alone)", tmp_dir / REPO_LOCK, holder)
    return cleared


def main(argv: list[str] | None = None) -> int:
    """CLI: clear stale locks and print what was cleared."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_root", nargs="?", default=".", help="DVC repository root (default: .)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")  # messages are printed below
    cleared = clear_stale_locks(args.repo_root)
    for msg in cleared:
        print(f"cleared: {msg}")
    if not cleared:
        print("no stale DVC locks")
    holder = repo_lock_holder(Path(args.repo_root) / ".dvc" / "tmp")
    if holder is not None:
        print(f"repo lock is held by live PID {holder}: another dvc command is running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
