"""The local runner asks DVC in-process which stages changed and starts a ``dvc repro`` process only for those and
what depends on them. Guards the DVC internals it uses (``Repo.index``, ``Stage.changed``, ``Repo.lock``; dvc is
pinned to 3.67.1)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.test_orchestrate import DVC_YAML, PARAMS, PY, ROOT, STEP_PY

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def done_repo(make_dvc_repo, dvc_env, dvc) -> Path:
    """The toy repo of ``test_orchestrate.py`` with every stage reproduced (sleeps shortened)."""
    files = {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS.replace("2", "0"), "step.py": STEP_PY}
    repo = make_dvc_repo("toy_noop", files)
    dvc(repo, "repro", "-q")
    return repo


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stages the runner hands to a ``dvc repro`` process (recorded, not run)."""
    from pipeline.orchestrate import execution

    calls: list[str] = []
    monkeypatch.setattr(execution, "run_stage", lambda stage, root, **kw: calls.append(stage) or "ran")
    return calls


def test_dvc_internals_the_runner_uses(done_repo: Path) -> None:
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(done_repo)) as repo, repo.lock:
        stages = {s.name: s for s in repo.index.stages}
        assert all(isinstance(s, PipelineStage) for s in stages.values())
        assert not any(s.changed() for s in stages.values())
    (done_repo / "extra.txt").unlink()
    try:
        with Repo(str(done_repo)) as repo, repo.lock:  # Stage.changed asserts that the repo lock is held
            assert {s.name for s in repo.index.stages if s.changed()} == {"extra"}
    finally:
        (done_repo / "extra.txt").write_text("1")


def test_up_to_date_stages_start_no_process(done_repo: Path, launched: list[str]) -> None:
    from pipeline.orchestrate.local import run_local

    assert run_local(done_repo) == dict.fromkeys(["extra", "source", "square@a", "square@b", "total"], "skipped")
    assert launched == []


def test_a_changed_stage_runs_with_what_depends_on_it(done_repo: Path, launched: list[str]) -> None:
    from pipeline.orchestrate.local import run_local

    params = done_repo / "params.yaml"
    before = params.read_text()
    params.write_text(before.replace("a:\n    sleep: 0", "a:\n    sleep: 1"))
    try:
        statuses = run_local(done_repo)
    finally:
        params.write_text(before)
    assert launched == ["square@a", "total"]
    assert statuses == {"extra": "skipped", "source": "skipped", "square@a": "ran", "square@b": "skipped",
                        "total": "ran"}


def test_force_and_an_unanswerable_check_hand_every_stage_to_dvc(done_repo: Path, launched: list[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.stage import PipelineStage

    from pipeline.orchestrate.local import run_local

    run_local(done_repo, targets=["total"], force=True)
    assert launched == ["source", "square@a", "square@b", "total"]
    launched.clear()

    def broken(self: Any, *args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("'sq_a.txt' is busy")

    monkeypatch.setattr(PipelineStage, "changed", broken)
    run_local(done_repo, targets=["total"])
    assert launched == ["source", "square@a", "square@b", "total"]


def test_cli_noop_run_prints_every_stage_skipped(done_repo: Path) -> None:
    out = subprocess.run([PY, "-m", "pipeline.orchestrate", "run"], cwd=done_repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "5 stage(s) up to date, skipped without a dvc process" in out.stdout
    assert ": 0 ran, 5 skipped" in out.stdout
