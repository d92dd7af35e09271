"""Fixtures for the pipeline tests that drive DVC: an isolated environment and toy git + DVC repositories.

Shared by ``test_flow.py`` (the Prefect flow) and ``test_orchestrate.py`` (the local runner). The repositories live in
pytest's temporary directories; nothing touches the project's own workspace, ``dvc.lock`` or MLflow store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

PY = sys.executable
# DVC analytics off, MLflow off, and a git identity so `git commit` works on a bare CI machine.
TEST_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "LONGTAIL_TRACKING": "off",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **TEST_ENV})


def _dvc(repo: Path, *args: str) -> str:
    out = subprocess.run(
        [PY, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True, text=True, env={**os.environ, **TEST_ENV}
    )
    return out.stdout


@pytest.fixture(scope="session")
def dvc() -> Callable[..., str]:
    """``dvc(repo, *args)`` runs ``python -m dvc <args>`` in ``repo`` and returns its stdout (fails on an error)."""
    return _dvc


@pytest.fixture(scope="module")
def dvc_env() -> Iterator[None]:
    """:data:`TEST_ENV` in ``os.environ`` for in-process code (the flow, the runner); restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TEST_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def make_dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of toy repositories: ``make_dvc_repo(name, files, config=..., commit=...)``.

    Creates a fresh git + DVC repository, sets the DVC ``config`` entries (``core.autostage`` is off unless given),
    writes ``files`` (``{relative path: text}``, e.g. ``dvc.yaml``, ``params.yaml``, step scripts) and, with
    ``commit``, commits them. Returns the repository root.
    """

    def make(
        name: str,
        files: Mapping[str, str] | None = None,
        *,
        config: Mapping[str, str] | None = None,
        commit: bool = True,
    ) -> Path:
        repo = tmp_path_factory.mktemp(name)
        _git(repo, "init", "-q")
        _dvc(repo, "init", "-q")
        for key, value in {"core.autostage": "false", **(config or {})}.items():
            _dvc(repo, "config", key, value)
        for rel, text in (files or {}).items():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_text(text)
        if commit:
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "-m", name)
        return repo

    return make


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory, dvc_env):
    """One ephemeral Prefect server for the module, in a temporary PREFECT_HOME, analytics off."""
    home = tmp_path_factory.mktemp("prefect_home")
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with prefect_test_harness(server_startup_timeout=90):
            yield
