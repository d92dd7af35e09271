"""A run with overrides after a local run: the ``dvc.lock`` the local run rewrote (its results differ in a bit from
the committed ones, as on another CPU) does not block it; a change to code still does, with the same message.

The toy repository commits a ``dvc.lock`` written "on another machine" (``MACHINE=a``) whose outputs this clone's
cache lacks (``dvc gc``), then reproduces locally (``MACHINE=b``), which leaves ``dvc.lock`` modified. The flow run
with an override then completes in an isolated worktree of HEAD that starts from the workspace's results (only the
stages the override touches run), saves a DVC experiment and leaves the workspace byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.pipeline.conftest import TEST_ENV

pytestmark = pytest.mark.pipeline

PY = sys.executable
STEP_PY = """import os, pathlib, sys
op, *a = sys.argv[1:]
P = pathlib.Path
if op == "write":
    P(a[0]).write_text(a[1])
elif op == "mul":
    P(a[2]).write_text(str(int(P(a[0]).read_text()) * int(a[1])))
elif op == "machine":  # an output that differs between machines, as trained weights differ in their last bits
    P(a[0]).write_text(os.environ.get("MACHINE", "?"))
"""
DVC_YAML = textwrap.dedent(
    f"""
    stages:
      source:
        cmd: {PY} step.py write source.txt 3
        deps:
          - step.py
        outs:
          - source.txt
      square:
        foreach: ${{items}}
        do:
          cmd: {PY} step.py mul source.txt ${{item.k}} sq_${{key}}.txt
          deps:
            - step.py
            - source.txt
          params:
            - items.${{key}}
          outs:
            - sq_${{key}}.txt
      weights:
        cmd: {PY} step.py machine weights.txt
        deps:
          - step.py
        outs:
          - weights.txt
    """
)
PARAMS = "items:\n  a:\n    k: 2\n  b:\n    k: 5\n"


def _run(repo: Path, *args: str, **env: str) -> str:
    proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, check=True,
                          env={**os.environ, **TEST_ENV, **env})
    return proc.stdout


def _state(repo: Path) -> dict[str, bytes | str]:
    """What a user sees of the workspace: git status and every file outside .git and .dvc."""
    files = {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*"))
             if p.is_file() and p.relative_to(repo).parts[0] not in (".git", ".dvc")}
    return {"git status": _run(repo, "git", "status", "--porcelain"), **files}



@pytest.fixture(scope="module")
def after_local_run(make_dvc_repo, dvc_env) -> Path:
    """A clone whose committed dvc.lock came from another machine, after a local run here that rewrote it."""
    repo = make_dvc_repo("after_local", {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS, "step.py": STEP_PY})
    _run(repo, PY, "-m", "dvc", "repro", MACHINE="a")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "dvc.lock of machine a")
    _run(repo, PY, "-m", "dvc", "repro", "--force", MACHINE="b")  # `make run` in a fresh clone on machine b
    _run(repo, PY, "-m", "dvc", "gc", "--workspace", "--force")  # machine a's outputs are not in this clone's cache
    assert _run(repo, "git", "status", "--porcelain").split() == ["M", "dvc.lock"]
    return repo


def test_pin_revision_ignores_what_runs_write_not_code(after_local_run: Path) -> None:
    from pipeline.orchestrate.workspace import DirtyTreeError, pin_revision

    head = _run(after_local_run, "git", "rev-parse", "HEAD").strip()
    assert pin_revision(after_local_run) == head  # dvc.lock modified by the local run
    step = after_local_run / "step.py"
    text = step.read_text()
    step.write_text(text + "# edited\n")
    try:
        with pytest.raises(DirtyTreeError, match=r"tracked files differ from HEAD: step.py\. Commit") as err:
            pin_revision(after_local_run)
        assert "dvc.lock" not in str(err.value)
    finally:
        step.write_text(text)


def test_override_run_after_local_run(after_local_run: Path, prefect_harness) -> None:
    from pipeline.flow import longtail_pipeline

    repo = after_local_run
    before = _state(repo)
    statuses = longtail_pipeline(repo_root=str(repo), overrides=["items.b.k=7"], name="after-local")
    # Only what the override touches runs: the worktree starts from the local run's results, not from machine a's.
    assert statuses == {"source": "skipped", "square@a": "skipped", "square@b": "ran", "weights": "skipped"}
    assert _state(repo) == before
    worktrees = _run(repo, "git", "worktree", "list")
    assert len(worktrees.splitlines()) == 1  # the temporary worktree is gone
    exps = json.loads(_run(repo, PY, "-m", "dvc", "exp", "show", "--json"))
    saved = {e["name"]: e["data"] for x in exps[1]["experiments"] for e in x["revs"]}
    assert saved["after-local"]["params"]["params.yaml"]["data"]["items"]["b"]["k"] == 7
