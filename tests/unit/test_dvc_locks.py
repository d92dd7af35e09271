"""Stale DVC rwlock recovery (format of dvc 3.67.1 ``dvc/rwlock.py``)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from pipeline.dvc_locks import clear_stale_locks, main, pid_alive, repo_lock_holder


@pytest.fixture
def dead_pid() -> int:
    """PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def zombie_pid():
    """PID of an exited but not yet reaped child (what a SIGKILLed `dvc repro` is until its parent waits)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # wait for exit without reaping
    yield proc.pid
    proc.wait()


def _write_rwlock(root, lock) -> None:
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "rwlock").write_text(json.dumps(lock))


def test_pid_alive(dead_pid, zombie_pid):
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid)
    assert not pid_alive(zombie_pid)
    assert not pid_alive(0)


def test_drops_dead_entries_keeps_live(tmp_path, dead_pid, zombie_pid):
    live = {"pid": os.getpid(), "cmd": "dvc repro b"}
    dead = {"pid": dead_pid, "cmd": "dvc repro a"}
    zombie = {"pid": zombie_pid, "cmd": "dvc repro z"}
    _write_rwlock(
        tmp_path,
        {
            "write": {"/r/data/a": dead, "/r/data/b": live, "/r/data/z": zombie},
            "read": {"/r/data/src": [dead, live], "/r/data/only_dead": [dead]},
        },
    )
    cleared = clear_stale_locks(tmp_path)
    assert len(cleared) == 4
    assert any("/r/data/a" in m and str(dead_pid) in m and "dvc repro a" in m for m in cleared)
    assert any("/r/data/z" in m and str(zombie_pid) in m for m in cleared)
    left = json.loads((tmp_path / ".dvc" / "tmp" / "rwlock").read_text())
    assert left == {"write": {"/r/data/b": live}, "read": {"/r/data/src": [live]}}
    assert clear_stale_locks(tmp_path) == []  # idempotent


def test_removes_file_when_all_dead(tmp_path, dead_pid):
    _write_rwlock(tmp_path, {"write": {"/r/out": {"pid": dead_pid, "cmd": "dvc repro x"}}, "read": {}})
    assert len(clear_stale_locks(tmp_path)) == 1
    assert not (tmp_path / ".dvc" / "tmp" / "rwlock").exists()


def test_nothing_to_do(tmp_path):
    assert clear_stale_locks(tmp_path) == []  # no .dvc/tmp at all
    _write_rwlock(tmp_path, {"read": {}})
    assert clear_stale_locks(tmp_path) == []
    assert (tmp_path / ".dvc" / "tmp" / "rwlock").exists()


def test_repo_lock_file_alone_is_not_held(tmp_path):
    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "lock").write_text(" 999999\n")  # left by a killed process: the flock died with it
    assert repo_lock_holder(tmp) is None
    with open(tmp / "lock", "r+") as fh:  # held through another open file description (flock semantics) = busy
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert repo_lock_holder(tmp) == 999999
    assert (tmp / "lock").exists()  # never deleted


def test_cli_prints_cleared(tmp_path, dead_pid, capsys):
    _write_rwlock(tmp_path, {"write": {"/r/out": {"pid": dead_pid, "cmd": "dvc repro x"}}})
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"dead PID {dead_pid}" in out and "/r/out" in out
    assert main([str(tmp_path)]) == 0
    assert "no stale DVC locks" in capsys.readouterr().out
