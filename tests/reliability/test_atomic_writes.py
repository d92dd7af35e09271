"""Interruptions the DVC runs cannot reach: a process killed while it swaps a previous output for the new one
(under DVC the output is already removed before the stage runs), and the dataset stage's own atomic write.

Each victim runs in its own session, since the kill hook SIGKILLs its whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _killed(code: str, cwd: Path, **env: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, start_new_session=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_the_kill_hook_is_inert_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io

    monkeypatch.setattr(pipeline.io, "_KILL_AT", None)
    monkeypatch.setattr(os, "killpg", lambda *a: pytest.fail("killpg called"))
    pipeline.io.kill_point("atomic_dir:start")
    pipeline.io.kill_point("checkpoint:saved", 1)


def test_killed_mid_swap_keeps_the_previous_output(tmp_path: Path) -> None:
    from pipeline.io import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    _killed("""
        from pipeline.io import atomic_dir
        with atomic_dir("out") as tmp:
            (tmp / "a.txt").write_text("new")
        """, tmp_path, LONGTAIL_TEST_KILL_AT="atomic_dir:swapped")
    assert not out.exists() and len(list(tmp_path.glob(".out.*"))) == 2  # moved aside, the new one not in place
    with pytest.raises(RuntimeError), atomic_dir(out):  # the next write fails: the previous output is back
        raise RuntimeError
    assert (out / "a.txt").read_text() == "old" and list(tmp_path.glob(".*")) == []
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and list(tmp_path.glob(".*")) == []


_BUILD = ("build_longtail(load_source('synthetic', num_classes=4, images_per_class=24, image_size=16, seed=0), "
          "imbalance_factor=4.0, n_max=12, test_per_class=4)")


@pytest.mark.parametrize("when", ["writing", "swapping"])
def test_dataset_killed_mid_write_leaves_nothing_once_rerun(tmp_path: Path, when: str) -> None:
    from pipeline.data import build_longtail, load_source, load_split, save_dataset  # noqa: F401 (used in _BUILD)

    ds = eval(_BUILD)
    save_dataset(ds, str(tmp_path / "dataset"))
    # kill on the second np.savez (half the splits written), or on the rename of the new directory into place
    patch = {"writing": "m.np.savez = lambda *a, **k: kill() if (n.append(1) or len(n) == 2) else savez(*a, **k)",
             "swapping": "os.rename = lambda s, d: kill() if '.tmp' in os.path.basename(s) else rename(s, d)"}[when]
    _killed(f"""
        import os, signal
        import pipeline.data.datasets as m
        from pipeline.data import build_longtail, load_source
        n, savez, rename = [], m.np.savez, os.rename
        kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
        {patch}
        m.save_dataset({_BUILD}, "dataset")
        """, tmp_path)
    assert list(tmp_path.glob(".dataset.*")), "the kill should leave a temporary directory"
    save_dataset(ds, str(tmp_path / "dataset"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (load_split(str(tmp_path / "dataset"), "train").labels == ds.splits["train"].labels).all()
