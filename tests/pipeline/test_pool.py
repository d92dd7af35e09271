"""Isolated runs and the work-pool executor on a toy DVC repo (docs/scale_out.md).

(a) A flow run with overrides leaves the workspace as it was (``git status`` clean, ``params.yaml`` and ``dvc.lock``
byte-identical) and is a DVC experiment with its params and metric. (b) A Prefect server (``prefect server start``),
a ``process`` work pool with the ``longtail-stage/run-stage`` deployment, two workers in two git clones and a
local-directory DVC remote: the two ``square@*`` stages (the "teachers") run on different workers, and the
experiment's metric equals a single-machine run's. Flows run as ``python -m pipeline.flow run`` subprocesses, as a
user runs them. MLflow is off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.pipeline.conftest import TEST_ENV

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]

# source → square@{a,b} (persisted uncached "checkpoints", like the teachers) → total (an uncached metric).
STEP_PY = """import json, os, pathlib, sys, time, yaml
op = sys.argv[1]
P = pathlib.Path
p = yaml.safe_load(open("params.yaml"))
if op == "source":
    P("out").mkdir(exist_ok=True)
    P("out/source.txt").write_text("3")
elif op == "sq":
    k = sys.argv[2]
    time.sleep(3)  # long enough that the second square is taken by the other worker
    P("out/sq").mkdir(parents=True, exist_ok=True)
    P("ck", k).mkdir(parents=True, exist_ok=True)
    P("ck", k, "state").write_text("x")
    P("out/sq", k).write_text(str(int(P("out/source.txt").read_text()) * p["items"][k]["k"]))
elif op == "total":
    P("out/rep").mkdir(parents=True, exist_ok=True)
    total = sum(int(P("out/sq", k).read_text()) for k in sorted(p["items"]))
    json.dump({"total": total}, open("out/rep/metrics.json", "w"))
"""
DVC_YAML = textwrap.dedent(
    """
    stages:
      source:
        cmd: python step.py source
        deps:
          - step.py
        outs:
          - out/source.txt
      square:
        foreach: ${items}
        do:
          cmd: python step.py sq ${key}
          deps:
            - step.py
            - out/source.txt
          params:
            - items.${key}
          outs:
            - out/sq/${key}
            - ck/${key}:
                persist: true
                cache: false
      total:
        cmd: python step.py total
        deps:
          - step.py
          - out/sq
        params:
          - items
        metrics:
          - out/rep/metrics.json:
              cache: false
    """
)
PARAMS = "items:\n  a:\n    k: 2\n  b:\n    k: 5\n"
OVERRIDES = ["-S", "items.a.k=4", "-S", "items.b.k=9"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **TEST_ENV, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.update(
        PATH=f"{Path(PY).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(ROOT),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
    )
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 200) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _experiments(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    shown = json.loads(_run([PY, "-m", "dvc", "exp", "show", "--json"], repo, env))
    return {e["name"]: e["data"] for base in shown[1:] for x in base.get("experiments") or [] for e in x["revs"]}


def _state(repo: Path) -> tuple[str, bytes, bytes]:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    return status, (repo / "params.yaml").read_bytes(), (repo / "dvc.lock").read_bytes()


@pytest.fixture(scope="module")
def toy(make_dvc_repo, tmp_path_factory) -> tuple[Path, Path]:
    """The toy repo, reproduced once with its committed params and ``dvc.lock`` committed; a PREFECT_HOME."""
    repo = make_dvc_repo(
        "pooltoy", {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS, "step.py": STEP_PY, ".gitignore": "/out/\n/ck/\n"}
    )
    home = tmp_path_factory.mktemp("prefect_home")
    env = _env(home)
    _run([PY, "-m", "pipeline.orchestrate", "run"], repo, env)
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "lock"], cwd=repo, check=True, env=env)
    return repo, home


def test_run_with_overrides_leaves_the_workspace_and_is_an_experiment(toy) -> None:
    repo, home = toy
    env = _env(home)
    before = _state(repo)
    assert before[0] == ""
    out = _run([PY, "-m", "pipeline.flow", "run", *OVERRIDES, "--name", "local-a4-b9"], repo, env)
    assert "square@a  ran" in out and "source    skipped" in out
    assert _state(repo) == before  # git status clean, params.yaml and dvc.lock byte-identical
    assert (repo / "out/rep/metrics.json").read_text() == json.dumps({"total": 3 * 2 + 3 * 5})
    exp = _experiments(repo, env)["local-a4-b9"]
    assert exp["params"]["params.yaml"]["data"]["items"] == {"a": {"k": 4}, "b": {"k": 9}}
    assert exp["metrics"]["out/rep/metrics.json"]["data"] == {"total": 3 * 4 + 3 * 9}
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(worktrees.splitlines()) == 1  # the temporary worktree is gone


def test_dirty_tree_is_refused(toy) -> None:
    from pipeline.orchestrate.workspace import DirtyTreeError, pin_revision

    repo, _ = toy
    step = repo / "step.py"
    text = step.read_text()
    step.write_text(text + "# edited\n")
    try:
        with pytest.raises(DirtyTreeError, match="step.py"):
            pin_revision(repo)
    finally:
        step.write_text(text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("prefect server not healthy in time")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_pool_runs_teachers_on_two_workers_like_one_machine(toy, tmp_path: Path) -> None:
    repo, home = toy
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = _env(home, PREFECT_API_URL=api)
    remote = tmp_path / "remote"
    remote.mkdir()
    _run([PY, "-m", "dvc", "remote", "add", "--local", "-d", "shared", str(remote)], repo, env)
    before = _state(repo)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        port = api.rsplit(":", 1)[1].split("/")[0]
        server = subprocess.Popen(
            [PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        procs.append(server)
        _wait_healthy(api, server)
        _run([PY, "-m", "pipeline.flow", "deploy-stage", "--pool", "toy-pool"], repo, env)
        for i in (1, 2):
            clone = tmp_path / f"worker-{i}"
            subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=env)
            _run([PY, "-m", "dvc", "remote", "add", "--local", "-d", "shared", str(remote)], clone, env)
            worker_env = {**env, "LONGTAIL_WORKER_REPO": str(clone), "LONGTAIL_WORKER_NAME": f"worker-{i}"}
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "prefect", "worker", "start", "--pool", "toy-pool", "--type", "process", "--limit", "1",
                     "--name", f"worker-{i}"],
                    cwd=clone, env=worker_env, stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        time.sleep(3)
        out = _run([PY, "-m", "pipeline.flow", "run", "--executor", "pool", *OVERRIDES, "--name", "pool-a4-b9"],
                   repo, env, timeout=240)  # fmt: skip
        workers = _stage_workers(api, env)
    finally:
        _stop(procs)
    assert "square@a  ran" in out and "total     ran" in out
    assert workers["square@a"] != workers["square@b"], workers  # the two "teachers" ran on different workers
    assert _state(repo) == before  # only .dvc/config.local (ignored) changed
    exps = _experiments(repo, env)
    pooled = exps["pool-a4-b9"]
    assert pooled["params"]["params.yaml"]["data"]["items"] == {"a": {"k": 4}, "b": {"k": 9}}
    # The same run on one machine (test (a)), or done here if (a) was deselected.
    if "local-a4-b9" not in exps:
        _run([PY, "-m", "pipeline.flow", "run", *OVERRIDES, "--name", "local-a4-b9"], repo, _env(home))
        exps = _experiments(repo, env)
    assert pooled["metrics"] == exps["local-a4-b9"]["metrics"]
    assert pooled["metrics"]["out/rep/metrics.json"]["data"] == {"total": 3 * 4 + 3 * 9}


def _stage_workers(api: str, env: dict[str, str]) -> dict[str, str]:
    """``{stage: worker}`` from the ``dvc-stage-result`` artifacts the stage flow runs recorded on the server."""
    code = textwrap.dedent(
        """
        import json
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
        only = ArtifactFilter(type=ArtifactFilterType(any_=["dvc-stage-result"]))
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=only)
        data = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in arts]
        print(json.dumps({d["stage"]: d["worker"] for d in data}))
        """
    )
    return json.loads(_run([PY, "-c", code], ROOT, env).strip().splitlines()[-1])
