"""The Prefect-free engine: the shared scheduler on in-memory futures, and the local runner on toy DVC repos.

``run_graph`` is checked with futures completed by hand (order, ``max_parallel``, failure semantics) and on a real
``ThreadPoolExecutor``. The local runner (``python -m pipeline.orchestrate run``) is checked end to end on a toy repo
like ``test_flow.py``'s (source → square@{a,b} → total, plus an independent ``extra``) whose step script records when
it ran and the thread budget it saw, so parallelism and ordering are measured rather than inferred from DVC's output.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.orchestrate.execution import (
    GraphFailedError,
    StageFailedError,
    StageLockError,
    _dvc_env,
    run_graph,
    threads_per_stage,
)

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# `step.py NAME SECONDS OUT [IN ...]`: sleep, write OUT (1 + the sum of the inputs), append a trace record.
STEP_PY = """import json, os, pathlib, sys, time
name, seconds, out, *ins = sys.argv[1:]
start = time.time()
time.sleep(float(seconds))
pathlib.Path(out).write_text(str(1 + sum(int(pathlib.Path(p).read_text()) for p in ins)))
rec = {"start": start, "end": time.time(), **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
pathlib.Path("trace").mkdir(exist_ok=True)
with open(pathlib.Path("trace", name + ".jsonl"), "a") as fh:
    fh.write(json.dumps(rec) + "\\n")
"""
DVC_YAML = textwrap.dedent(
    f"""
    stages:
      source:
        cmd: {PY} step.py source 0 source.txt
        deps:
          - step.py
        outs:
          - source.txt
      square:
        foreach: ${{items}}
        do:
          cmd: {PY} step.py square@${{key}} ${{item.sleep}} sq_${{key}}.txt source.txt
          deps:
            - step.py
            - source.txt
          params:
            - items.${{key}}
          outs:
            - sq_${{key}}.txt
      total:
        cmd: {PY} step.py total 0 total.txt sq_a.txt sq_b.txt
        deps:
          - step.py
          - sq_a.txt
          - sq_b.txt
        outs:
          - total.txt
      extra:
        cmd: {PY} step.py extra 0 extra.txt
        outs:
          - extra.txt
    """
)
PARAMS = "items:\n  a:\n    sleep: 2\n  b:\n    sleep: 2\n"
UPSTREAM = {
    "source": [],
    "square@a": ["source"],
    "square@b": ["source"],
    "total": ["square@a", "square@b"],
    "extra": [],
}


def _traces(repo: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((repo / "trace").glob("*"))
    }


def _lock_stages(repo: Path) -> set[str]:
    return set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])


def _status_lines(stdout: str) -> dict[str, str]:
    """The ``name  status`` table the runner prints at the end."""
    return dict(m.groups() for m in re.finditer(r"^(\S+)\s{2,}(ran|skipped|failed|not run)$", stdout, re.M))


@pytest.fixture
def no_thread_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------------------------------------------------
# run_graph on futures completed by hand
# --------------------------------------------------------------------------------------------------------------------
class HandRuntime:
    """``submit`` / ``as_completed`` for :func:`run_graph` whose futures finish only when it asks for one.

    ``as_completed`` finishes the oldest running future (``lifo``: the newest), failing it when its stage is in
    ``fail``; ``events`` records ``("start", stage, upstream)`` and ``("end", stage)`` in order.
    """

    def __init__(self, fail: tuple[str, ...] = (), lifo: bool = False) -> None:
        self.fail, self.lifo = set(fail), lifo
        self.names: dict[concurrent.futures.Future, str] = {}
        self.running: list[concurrent.futures.Future] = []
        self.events: list[tuple] = []
        self.peak = 0

    def submit(self, name: str, upstream: list[concurrent.futures.Future]) -> concurrent.futures.Future:
        assert all(u.done() and u.exception() is None for u in upstream), f"{name} submitted before its upstream"
        self.events.append(("start", name, sorted(self.names[u] for u in upstream)))
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.names[fut] = name
        self.running.append(fut)
        self.peak = max(self.peak, len(self.running))
        return fut

    def as_completed(self, futures: list[concurrent.futures.Future]) -> Iterator[concurrent.futures.Future]:
        assert set(futures) == set(self.running)
        fut = self.running.pop(-1 if self.lifo else 0)
        name = self.names[fut]
        self.events.append(("end", name))
        if name in self.fail:
            fut.set_exception(StageFailedError(f"dvc repro {name} failed with exit code 1:\nboom"))
        else:
            fut.set_result(f"{name}:ok")
        yield fut

    def started(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "start"]


@pytest.mark.parametrize("lifo", [False, True])
def test_run_graph_respects_dependencies(lifo):
    rt = HandRuntime(lifo=lifo)
    result = run_graph(UPSTREAM, rt.submit, rt.as_completed, max_parallel=2)
    assert result == {name: f"{name}:ok" for name in UPSTREAM}
    assert list(result) == list(UPSTREAM)  # graph order, whatever the completion order
    assert sorted(rt.started()) == sorted(UPSTREAM)  # each stage once
    for i, event in enumerate(rt.events):
        if event[0] == "start":
            name, ups = event[1], event[2]
            assert ups == UPSTREAM[name]  # upstream futures are handed over (Prefect's wait_for)
            assert all(("end", u) in rt.events[:i] for u in ups)
    assert rt.started()[:2] == ["source", "extra"]  # the ready stages, in graph order


@pytest.mark.parametrize("max_parallel", [1, 2, 4])
def test_run_graph_keeps_max_parallel(max_parallel):
    graph = {f"s{i}": [] for i in range(6)}
    rt = HandRuntime()
    run_graph(graph, rt.submit, rt.as_completed, max_parallel)
    assert rt.peak == max_parallel
    assert rt.started() == list(graph)


def test_run_graph_failure_starts_nothing_new_and_lets_running_finish():
    graph = {"a": [], "b": [], "c": ["a"], "d": [], "e": ["c"]}
    rt = HandRuntime(fail=("a",))
    with pytest.raises(GraphFailedError) as info:
        run_graph(graph, rt.submit, rt.as_completed, max_parallel=2)
    exc = info.value
    assert rt.started() == ["a", "b"]  # d was ready but not started after a failed
    assert rt.events[-1] == ("end", "b")  # the running sibling finished
    assert list(exc.failures) == ["a"] and exc.completed == {"b": "b:ok"} and exc.not_run == ["c", "d", "e"]
    assert isinstance(exc, StageFailedError) and isinstance(exc.__cause__, StageFailedError)
    assert "completed: {'b': 'b:ok'}; not run: ['c', 'd', 'e']" in str(exc)
    summary = exc.summary()
    assert "\n" not in summary
    assert summary == "stage(s) a failed (dvc repro a failed with exit code 1); completed: b; not run: c, d, e"


def test_run_graph_collects_every_failure_of_running_stages():
    rt = HandRuntime(fail=("a", "b"))
    with pytest.raises(GraphFailedError) as info:
        run_graph({"a": [], "b": [], "c": []}, rt.submit, rt.as_completed, max_parallel=2)
    assert list(info.value.failures) == ["a", "b"] and info.value.not_run == ["c"]


def test_run_graph_rejects_bad_graphs():
    rt = HandRuntime()
    with pytest.raises(ValueError, match="max_parallel"):
        run_graph({"a": []}, rt.submit, rt.as_completed, 0)
    with pytest.raises(ValueError, match="not in the graph"):
        run_graph({"a": ["missing"]}, rt.submit, rt.as_completed, 1)
    with pytest.raises(ValueError, match="cycle"):
        run_graph({"a": ["b"], "b": ["a"]}, rt.submit, rt.as_completed, 1)


def test_run_graph_on_a_thread_pool():
    """The local runner's pairing: real threads, ``concurrent.futures.as_completed``; parallel up to the limit."""
    graph = {"root": [], **{f"w{i}": ["root"] for i in range(5)}, "join": [f"w{i}" for i in range(5)]}
    lock, active, peak, finished = threading.Lock(), [0], [0], []

    def work(name: str) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
            finished.append(name)
        return name.upper()

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        result = run_graph(graph, lambda n, ups: pool.submit(work, n), concurrent.futures.as_completed, 3)
    assert result == {n: n.upper() for n in graph}
    assert peak[0] == 3
    assert finished[0] == "root" and finished[-1] == "join"


# --------------------------------------------------------------------------------------------------------------------
# Pieces of the stage execution
# --------------------------------------------------------------------------------------------------------------------
def test_stage_env_shares_threads_and_respects_user_settings(monkeypatch, no_thread_env):
    from pipeline.tracking import PARENT_RUN_ENV

    monkeypatch.setenv(PARENT_RUN_ENV, "stale")
    env = _dvc_env(None, threads=3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert PARENT_RUN_ENV not in env and env["DVC_NO_ANALYTICS"]
    assert _dvc_env("run-1")[PARENT_RUN_ENV] == "run-1" and "OMP_NUM_THREADS" not in _dvc_env("run-1")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    env = _dvc_env(None, threads=3)
    assert env["OMP_NUM_THREADS"] == "7" and env["MKL_NUM_THREADS"] == "3"

    cpus = os.cpu_count() or 1
    assert threads_per_stage(1) == cpus and threads_per_stage(2) == max(1, cpus // 2)
    assert threads_per_stage(10 * cpus) == 1


def test_lock_errors_are_retried_and_failures_are_not(monkeypatch):
    from pipeline.orchestrate import execution

    calls: list[str] = []

    def flaky(stage: str, repo_root: str, **kwargs: Any) -> str:
        calls.append(stage)
        if stage == "broken":
            raise StageFailedError("exit 1")
        if len(calls) < 3:
            raise StageLockError("busy")
        return "ran"

    monkeypatch.setattr(execution, "run_stage", flaky)
    assert execution.run_stage_retrying("s", ".", delay_s=0) == "ran" and calls == ["s"] * 3
    calls.clear()
    with pytest.raises(StageLockError):
        execution.run_stage_retrying("s", ".", retries=1, delay_s=0)
    assert calls == ["s"] * 2
    calls.clear()
    with pytest.raises(StageFailedError):
        execution.run_stage_retrying("broken", ".", delay_s=0)
    assert calls == ["broken"]


def test_engine_imports_neither_prefect_nor_mlflow():
    code = (
        "import sys, pipeline.orchestrate.local, pipeline.orchestrate.overrides; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))"
    )
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------------
# The local runner on toy DVC repositories
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_repo(make_dvc_repo, dvc_env) -> Path:
    return make_dvc_repo("toy_local", {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS, "step.py": STEP_PY})


@pytest.fixture(scope="module")
def first_run(toy_repo) -> subprocess.CompletedProcess:
    """``python -m pipeline.orchestrate run`` (the real CLI, default -j 2) once on the fresh toy repo."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [PY, "-m", "pipeline.orchestrate", "run"], cwd=toy_repo, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.pipeline
def test_runner_runs_every_stage_once_in_order_in_parallel(toy_repo, first_run, dvc):
    assert first_run.returncode == 0, first_run.stdout + first_run.stderr
    out = first_run.stdout
    assert _status_lines(out) == dict.fromkeys(UPSTREAM, "ran")
    assert re.search(r"^5 stage\(s\) in [\d.]+ s: 5 ran, 0 skipped$", out, re.M)
    for name in UPSTREAM:  # progress and DVC's own lines, prefixed with the stage
        assert f"[{name}] started: dvc --wait-for-lock repro --single-item {name}" in out
        assert f"[{name}] Running stage '{name}':" in out
        assert re.search(rf"^\[{re.escape(name)}\] ran in [\d.]+ s$", out, re.M)

    traces = _traces(toy_repo)
    assert {name: len(recs) for name, recs in traces.items()} == dict.fromkeys(UPSTREAM, 1)
    span = {name: recs[0] for name, recs in traces.items()}
    for name, ups in UPSTREAM.items():
        assert all(span[name]["start"] >= span[up]["end"] for up in ups), (name, span)
    a, b = span["square@a"], span["square@b"]
    assert max(a["start"], b["start"]) < min(a["end"], b["end"]), "independent stages did not overlap"
    assert (toy_repo / "total.txt").read_text() == "5"  # 1 + 2 * (1 + 1)

    assert json.loads(dvc(toy_repo, "status", "--json")) == {}
    assert _lock_stages(toy_repo) == set(UPSTREAM)


@pytest.mark.pipeline
def test_runner_shares_cpus_between_parallel_stages(toy_repo, first_run):
    expected = str(max(1, (os.cpu_count() or 1) // 2))  # -j 2
    for name, recs in _traces(toy_repo).items():
        assert recs[0]["OMP_NUM_THREADS"] == recs[0]["MKL_NUM_THREADS"] == expected, name


@pytest.mark.pipeline
def test_runner_second_run_skips_everything(toy_repo, first_run, dvc, monkeypatch, capsys):
    from pipeline.orchestrate.local import main

    monkeypatch.chdir(toy_repo)
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert _status_lines(out) == dict.fromkeys(UPSTREAM, "skipped")
    assert "5 stage(s) in" in out and ": 0 ran, 5 skipped" in out
    assert {name: len(recs) for name, recs in _traces(toy_repo).items()} == dict.fromkeys(UPSTREAM, 1)
    assert json.loads(dvc(toy_repo, "status", "--json")) == {}


@pytest.mark.pipeline
def test_runner_forced_target_keeps_a_user_thread_setting(toy_repo, first_run, monkeypatch, capsys, no_thread_env):
    from pipeline.orchestrate.local import main

    monkeypatch.chdir(toy_repo)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert main(["run", "-t", "extra", "-f", "-j", "1"]) == 0
    assert _status_lines(capsys.readouterr().out) == {"extra": "ran"}
    last = _traces(toy_repo)["extra"][-1]
    assert last["OMP_NUM_THREADS"] == "3" and last["MKL_NUM_THREADS"] == str(os.cpu_count() or 1)


@pytest.mark.pipeline
def test_runner_failure_is_one_line_and_siblings_finish(make_dvc_repo, dvc_env, monkeypatch, capsys):
    from pipeline.orchestrate.local import main

    dvc_yaml = textwrap.dedent(
        f"""
        stages:
          a_fail:
            cmd: {PY} -c "raise SystemExit(3)"
            outs:
              - a.txt
          b_slow:
            cmd: {PY} step.py b_slow 3 b.txt
            outs:
              - b.txt
          c_later:
            cmd: {PY} step.py c_later 0 c.txt
            outs:
              - c.txt
          d_after:
            cmd: {PY} step.py d_after 0 d.txt a.txt
            deps:
              - a.txt
            outs:
              - d.txt
        """
    )
    repo = make_dvc_repo("failing_local", {"dvc.yaml": dvc_yaml, "step.py": STEP_PY})
    monkeypatch.chdir(repo)
    assert main(["run", "-j", "2"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a_fail" in errors[0], captured.err
    assert "not run: c_later, d_after" in errors[0]
    assert _status_lines(captured.out) == {
        "b_slow": "ran",
        "a_fail": "failed",
        "c_later": "not run",
        "d_after": "not run",
    }
    assert (repo / "b.txt").exists() and _lock_stages(repo) == {"b_slow"}  # the running sibling finished
    assert not (repo / "c.txt").exists() and not (repo / "d.txt").exists()


@pytest.mark.pipeline
def test_runner_initialises_tracking_store_before_any_stage(toy_repo, first_run, monkeypatch):
    """With tracking on, the MLflow store is created once (on the replay thread, before any journal is replayed: the
    stages never open it); no parent run."""
    from pipeline.orchestrate import execution, local

    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(local, "tracking_enabled", lambda: True)
    monkeypatch.setattr(local, "init_store", lambda root: calls.append(("init", Path(root))))
    monkeypatch.setattr(execution, "run_stage", lambda stage, root, **kw: calls.append((stage, kw)) or "skipped")
    assert local.run_local(toy_repo, targets=["total"], force=True) == dict.fromkeys(
        ["source", "square@a", "square@b", "total"], "skipped"
    )
    assert ("init", toy_repo.resolve()) in calls and [c[0] for c in calls].count("init") == 1
    assert all(kw.get("parent_run_id") is None and kw["threads"] == threads_per_stage(2) for _, kw in calls[1:])


# `tracked.py NAME [fail]`: one MLflow run through create_tracker, then OUT = the heavy modules the stage imported.
TRACKED_PY = """import pathlib, sys
from pipeline.tracking import create_tracker
name = sys.argv[1]
with create_tracker(name, name, {"toy": "yes"}) as tr:
    tr.log_params({"stage": {"name": name}})
    tr.log_metrics({"m": 1.0}, step=1)
    pathlib.Path(name + ".txt").write_text(str(sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "pandas"})))
    if sys.argv[2:] == ["fail"]:
        raise SystemExit("failing on purpose")
"""


@pytest.mark.pipeline
def test_runner_writes_the_stages_mlflow_runs_from_their_journals(make_dvc_repo, dvc_env, tmp_path, monkeypatch):
    """Tracking on: the stages import no mlflow; their runs (a failed one too) are in the store when the runner
    returns, with the stage's tags, params, metrics and status; no journal is left behind."""
    import mlflow

    from pipeline.orchestrate.local import run_local

    stages = {
        "a": {"cmd": f"{PY} tracked.py a", "deps": ["tracked.py"], "outs": ["a.txt"]},
        "b": {"cmd": f"{PY} tracked.py b", "deps": ["tracked.py", "a.txt"], "outs": ["b.txt"]},
        "bad": {"cmd": f"{PY} tracked.py bad fail", "deps": ["tracked.py", "b.txt"], "outs": ["bad.txt"]},
    }
    repo = make_dvc_repo("toy_tracked", {"dvc.yaml": yaml.safe_dump({"stages": stages}), "tracked.py": TRACKED_PY})
    for key in ("MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID", "LONGTAIL_RUN_TAGS", "LONGTAIL_TRACKING_JOURNAL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LONGTAIL_TRACKING", "on")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    journals = tmp_path / "tmp"
    journals.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(journals))
    with pytest.raises(GraphFailedError) as failed:
        run_local(repo)
    assert list(failed.value.failures) == ["bad"] and set(failed.value.completed) == {"a", "b"}
    assert (repo / "a.txt").read_text() == (repo / "b.txt").read_text() == "[]"  # no mlflow in the stages
    assert list(journals.iterdir()) == []  # every journal replayed and deleted

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("longtail-pipeline").experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == ["a", "b", "bad"]
    assert {s: r.info.status for s, r in by_stage.items()} == {"a": "FINISHED", "b": "FINISHED", "bad": "FAILED"}
    for name, run in by_stage.items():
        assert run.data.params == {"stage.name": name} and run.data.metrics == {"m": 1.0}
        assert run.data.tags["dvc_stage"] == name and run.data.tags["toy"] == "yes" and run.data.tags["git_commit"]
        assert run.data.tags["mlflow.source.name"].endswith("tracked.py")
        assert run.info.start_time <= run.info.end_time
