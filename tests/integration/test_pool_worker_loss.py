"""A worker lost mid-stage in a pool run (``scripts/pool.sh -- python -m pipeline.flow run --executor pool``).

(a) Two workers; SIGKILL of the worker running ``teacher@ce`` (and of everything it started: what a lost node looks
like) once the teacher's first checkpoint reached the shared store. Prefect's heartbeat automation marks the stage run
``Crashed``, the pipeline run submits it again, the other worker fetches the checkpoint and resumes, and the run
completes; the teacher's weights equal an uninterrupted single-machine run's bit for bit, and no flow run is left
``Running``. (b) A stage whose every attempt crashes ends the run ``Failed``, with one line naming it, in bounded time.
(c) One Ctrl-C stops the run and cancels its stage runs. (d) A run that a worker took (``Pending``) but never started
(its worker lost in between) is marked ``Crashed`` by the second automation, and the stage is resubmitted and completes
on a live worker.

Short on purpose: one teacher of the digits data set, heartbeats every 30 s (Prefect's minimum) and a 45 s automation
window, so a lost stage is seen 15-50 s after the loss. MLflow is off.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_pool_pipeline import _params
from tests.pipeline.conftest import TEST_ENV
from tests.pipeline.test_pool import _free_port, _stop, _wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.pipeline, pytest.mark.soak]

PY = sys.executable
EPOCHS = 6
CRASH_AFTER_S = 45
PENDING_AFTER_S = 20  # (d) only: the other tests' real runs keep the default window


@pytest.fixture(scope="module")
def pool_repo(tmp_path_factory, copy_repo) -> Path:
    """A committed copy of the project with one short teacher (checkpoints every epoch and every 2 updates)."""
    repo = tmp_path_factory.mktemp("loss") / "repo"
    repo.mkdir()
    copy_repo(repo, {})
    params = _params(repo)
    params["teachers"] = {"ce": {**params["teachers"]["ce"], "epochs": EPOCHS, "checkpoint_every": 2}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(repo, repo.parent / "prefect", "")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "tiny"], cwd=repo, env=env, check=True)
    return repo


@pytest.fixture(scope="module")
def server(pool_repo: Path) -> str:
    """A ``prefect server start`` both tests share (pool.sh uses a healthy server at PREFECT_API_URL)."""
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = _env(pool_repo, pool_repo.parent / "prefect", api)
    log = open(pool_repo.parent / "server.log", "w")
    port = api.rsplit(":", 1)[1].split("/")[0]
    proc = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(api, proc)
        yield api
    finally:
        _stop([proc])


def _env(repo: Path, home: Path, api: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, **TEST_ENV, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "PYTHON": PY, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "LONGTAIL_CRASH_AFTER_S": str(CRASH_AFTER_S), "PREFECT_API_URL": api}
    for key in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID", "LONGTAIL_TEST_KILL_AT"):
        env.pop(key, None)
    if not api:
        env.pop("PREFECT_API_URL")
    env.update(extra)
    return env


def _pool_run(repo: Path, env: dict[str, str], pool_dir: Path, *args: str) -> subprocess.Popen:
    cmd = ["bash", "scripts/pool.sh", "--", PY, "-m", "pipeline.flow", "run", "--executor", "pool", "-j", "2",
           "-t", "teacher@ce", *args]
    out = open(pool_dir.parent / f"{pool_dir.name}.out", "w")
    return subprocess.Popen(cmd, cwd=repo, env={**env, "POOL_DIR": str(pool_dir)}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, pool_dir: Path, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        pytest.fail(f"the pool run did not end in {timeout} s:\n{_logs(pool_dir)[-6000:]}")
    return proc.returncode, (pool_dir.parent / f"{pool_dir.name}.out").read_text()


def _logs(pool_dir: Path) -> str:
    out = (pool_dir.parent / f"{pool_dir.name}.out").read_text()
    workers = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((pool_dir / "logs").glob("worker-*")))
    return out + workers


def _kill_worker(name: str) -> list[int]:
    """SIGKILL the worker ``name`` and every process it started (its flow run, ``dvc repro``, the stage)."""
    import psutil

    worker = next(p for p in psutil.process_iter(["cmdline"])
                  if "worker" in (p.info["cmdline"] or []) and name in (p.info["cmdline"] or []))
    procs = [worker, *worker.children(recursive=True)]
    for p in procs:
        p.kill()
    return [p.pid for p in procs]


def _flow_runs(api: str, repo: Path) -> list[dict]:
    code = textwrap.dedent(
        """
        import json
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(limit=200)
        print(json.dumps([{"name": r.name, "state": r.state.type.value, "message": r.state.message} for r in runs]))
        """
    )
    env = _env(repo, repo.parent / "prefect", api)
    out = subprocess.run([PY, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _experiment_file(repo: Path, exp: str, out: str, name: str) -> Path:
    """``<out>/<name>`` as experiment ``exp`` recorded it: its object in the cache (from its dvc.lock entry)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.split()
    ref = next(r for r in refs if r.endswith(f"/{exp}"))
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=repo, capture_output=True,
                                         text=True, check=True).stdout)
    md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out)
    listing = json.loads((repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == name)
    return repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def _same_weights(a: Path, b: Path) -> bool:
    """Every tensor equal, bit for bit (the files' bytes may differ: torch names the archive after the file)."""
    import torch

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))

    def flat(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from flat(v, f"{prefix}{k}.")
        elif isinstance(node, torch.Tensor):
            yield prefix, node

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    ta, tb = dict(flat(sa)), dict(flat(sb))
    return bool(ta) and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(bits(ta[k]), bits(tb[k]))
        for k in ta)


def test_a_lost_worker_s_stage_resumes_on_the_other_worker(pool_repo: Path, server: str) -> None:
    repo, pool_dir = pool_repo, pool_repo.parent / "pool-a"
    env = _env(repo, repo.parent / "prefect", server)
    started = time.monotonic()
    proc = _pool_run(repo, env, pool_dir, "--name", "lost-worker")
    try:
        store = pool_dir / "remote" / "longtail-checkpoints"
        deadline = time.monotonic() + 600
        while not list(store.glob("*/checkpoints/teachers/ce/checkpoint.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, _logs(pool_dir)[-6000:]
            time.sleep(0.2)
        logs = {p.stem: p.read_text() for p in (pool_dir / "logs").glob("worker-*.log")}
        lost = next(w for w, text in logs.items() if "[teacher@ce] on worker" in text)
        killed = _kill_worker(lost)
        killed_at = time.monotonic()
        rc, out = _finish(proc, pool_dir, timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    logs = _logs(pool_dir)
    assert rc == 0, logs[-8000:]
    survivor = next(w for w in ("worker-1", "worker-2") if w != lost)
    survivor_log = (pool_dir / "logs" / f"{survivor}.log").read_text()
    assert re.search(r"\[teacher@ce\] ran on " + survivor + r" after 1 crashed attempt\(s\); resumed from "
                     r"checkpoints/teachers/ce/checkpoint.pt", out), out[-6000:]
    assert "resuming from checkpoint checkpoints/teachers/ce/checkpoint.pt" in survivor_log, survivor_log[-4000:]
    print(f"killed {lost} ({len(killed)} processes) {killed_at - started:.0f} s in; run ended "
          f"{time.monotonic() - killed_at:.0f} s later")

    runs = _flow_runs(server, repo)
    assert not [r for r in runs if r["state"] in ("RUNNING", "PENDING", "CANCELLING", "SCHEDULED")], runs
    crashed = [r for r in runs if r["state"] == "CRASHED"]
    assert [r["name"] for r in crashed] == ["teacher@ce"], runs
    assert "no heartbeat" in crashed[0]["message"], crashed  # found by Prefect's heartbeat automation

    # The same commit on one machine, uninterrupted: the same weights, bit for bit.
    pooled = _experiment_file(repo, "lost-worker", "data/teachers/ce", "model.pt")
    local_env = _env(repo, repo.parent / "prefect", "")
    local = subprocess.run([PY, "-m", "pipeline.orchestrate", "run", "-t", "teacher@ce", "--force"], cwd=repo,
                           env=local_env, capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert "resuming" not in local.stdout + local.stderr
    assert _same_weights(repo / "data/teachers/ce/model.pt", pooled)


def test_a_stage_that_always_crashes_fails_the_run_in_bounded_time(pool_repo: Path, server: str) -> None:
    repo, pool_dir = pool_repo, pool_repo.parent / "pool-b"
    # Every attempt of the teacher kills its process group (flow run, dvc repro, the stage) before it trains.
    env = _env(repo, repo.parent / "prefect", server, LONGTAIL_TEST_KILL_AT="checkpoint:load")
    started = time.monotonic()
    proc = _pool_run(repo, env, pool_dir, "--name", "always-crashes", "--crash-retries", "1")
    rc, out = _finish(proc, pool_dir, timeout=600)
    elapsed = time.monotonic() - started
    assert rc == 1, _logs(pool_dir)[-6000:]
    lines = [line for line in out.splitlines() if line.startswith("pipeline.flow: ")]
    assert len(lines) == 1, out[-4000:]
    assert lines[0].startswith("pipeline.flow: teacher@ce: crashed 2 time(s), no retry left"), lines
    runs = _flow_runs(server, repo)
    assert not [r for r in runs if r["state"] in ("RUNNING", "PENDING", "CANCELLING", "SCHEDULED")], runs
    pipeline_run = [r for r in runs if r["name"] not in ("teacher@ce", "dataset") and r["state"] == "FAILED"]
    assert pipeline_run, runs
    print(f"failed after {elapsed:.0f} s")


def test_one_ctrl_c_stops_the_run_and_cancels_its_stage_runs(pool_repo: Path, server: str) -> None:
    import psutil

    repo, pool_dir = pool_repo, pool_repo.parent / "pool-c"
    env = _env(repo, repo.parent / "prefect", server)
    proc = _pool_run(repo, env, pool_dir, "--name", "interrupted")
    try:
        deadline = time.monotonic() + 300
        while not any("[teacher@ce] on worker" in p.read_text() for p in (pool_dir / "logs").glob("worker-*.log")):
            assert proc.poll() is None and time.monotonic() < deadline, _logs(pool_dir)[-6000:]
            time.sleep(0.5)
        flow = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "pipeline.flow" in p.cmdline() and "run" in p.cmdline())
        flow.send_signal(signal.SIGINT)  # one Ctrl-C of `python -m pipeline.flow run`
        interrupted = time.monotonic()
        flow.wait(timeout=60)
        stopped_in = time.monotonic() - interrupted
        rc, out = _finish(proc, pool_dir, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0 and "pipeline.flow: interrupted" in out, out[-4000:]
    runs = _flow_runs(server, repo)
    teacher = [r for r in runs if r["name"] == "teacher@ce" and r["state"] not in ("COMPLETED", "CRASHED")]
    assert teacher and all(r["state"] in ("CANCELLED", "CANCELLING") for r in teacher), runs
    print(f"stopped {stopped_in:.1f} s after one SIGINT")


# (d) The stage's first flow run is taken as a worker takes one (Scheduled -> Pending, through the API the worker uses)
# while the pool is paused, so no real worker can take it first; then that "worker" is gone: nothing ever starts it.
# The pool is resumed at once, so the resubmitted run goes to the live worker. Run by pool.sh as its command, around
# the pipeline run; writes what the server recorded to a JSON file.
_TAKER = """
import json, subprocess, sys, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.states import Pending, Submitting

pool, out, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name("longtail-stage/run-stage")
    of_stage = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    before = {r.id for r in client.read_flow_runs(deployment_filter=of_stage)}
    client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
    try:
        proc = subprocess.Popen(cmd)
        scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
        taken = None
        while taken is None and proc.poll() is None:
            runs = client.read_flow_runs(deployment_filter=of_stage, flow_run_filter=scheduled)
            taken = next((r for r in runs if r.id not in before), None)
            time.sleep(0.1)
        if taken is not None:
            client.set_flow_run_state(taken.id, Pending())  # what a worker proposes when it takes a run,
            client.set_flow_run_state(taken.id, Submitting())  # and then, before it starts the run's process
    finally:
        client.update_work_pool(pool, WorkPoolUpdate(is_paused=False))
    rc = proc.wait()
    runs = sorted((r for r in client.read_flow_runs(deployment_filter=of_stage) if r.id not in before),
                  key=lambda r: r.created)
    taken_id = taken.id if taken is not None else None
    json.dump([{"id": str(r.id), "name": r.name, "taken": r.id == taken_id, "created": r.created.timestamp(),
                "states": [{"type": s.type.value, "name": s.name, "message": s.message, "at": s.timestamp.timestamp()}
                           for s in sorted(client.read_flow_run_states(r.id), key=lambda s: s.timestamp)]}
               for r in runs], open(out, "w"))
sys.exit(rc)
"""


def test_a_run_taken_but_never_started_is_crashed_and_resubmitted(pool_repo: Path, server: str) -> None:
    repo, pool_dir = pool_repo, pool_repo.parent / "pool-d"
    env = _env(repo, repo.parent / "prefect", server, LONGTAIL_PENDING_AFTER_S=str(PENDING_AFTER_S),
               POOL="pending-loss", WORKERS="1", POOL_DIR=str(pool_dir))
    taker, record = repo.parent / "taker.py", repo.parent / "pending-loss.json"
    taker.write_text(_TAKER)
    cmd = ["bash", "scripts/pool.sh", "--", PY, str(taker), "pending-loss", str(record),
           PY, "-m", "pipeline.flow", "run", "--executor", "pool", "-t", "dataset", "--name", "pending-loss"]
    started = time.monotonic()
    out_file = open(pool_dir.parent / f"{pool_dir.name}.out", "w")
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True)
    rc, out = _finish(proc, pool_dir, timeout=300)
    elapsed = time.monotonic() - started
    assert rc == 0, _logs(pool_dir)[-8000:]
    runs = json.loads(record.read_text())
    assert len(runs) == 2 and runs[0]["taken"], runs
    taken, resubmitted = runs
    states = [(s["type"], s["name"]) for s in taken["states"]]
    assert states == [("SCHEDULED", "Scheduled"), ("PENDING", "Pending"), ("PENDING", "Submitting"),
                      ("CRASHED", "Crashed")], taken  # never Running
    pending_at, crashed = taken["states"][1]["at"], taken["states"][-1]
    message = f"taken by a worker but not started within {PENDING_AFTER_S} s: its worker was lost"
    assert crashed["message"] == message, crashed
    to_crashed = crashed["at"] - pending_at
    assert PENDING_AFTER_S <= to_crashed <= PENDING_AFTER_S + 15, to_crashed  # evaluated every 5 s
    assert re.search(rf"\[dataset\] flow run {re.escape(taken['name'])} crashed \({message}\): submitting it again, "
                     r"attempt 2 of 3", out), out[-6000:]
    assert re.search(r"\[dataset\] ran on worker-1 after 1 crashed attempt\(s\)", out), out[-6000:]
    assert [s["type"] for s in resubmitted["states"]][-3:] == ["PENDING", "RUNNING", "COMPLETED"], resubmitted
    at = {s["type"]: s["at"] for s in resubmitted["states"]}
    print(f"Pending -> Crashed {to_crashed:.1f} s (window {PENDING_AFTER_S} s); resubmitted "
          f"{resubmitted['created'] - crashed['at']:.1f} s later; its worker started it "
          f"{at['RUNNING'] - at['PENDING']:.1f} s after taking it; test {elapsed:.0f} s")
