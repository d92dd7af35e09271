"""The Prefect flow over dvc.yaml on a toy DVC repo: stage graph, a full run, a no-op rerun, overrides.

Guards the internal ``Repo().index.graph`` API the flow relies on against ``dvc stage list`` (DESIGN.md
"Orchestration"). One session-scoped ``prefect_test_harness`` with a temporary PREFECT_HOME (ECOSYSTEM.md §2.2 CI
recipe); MLflow tracking is off. The toy repositories and the DVC environment come from ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline

PY = sys.executable

# A 4-stage DAG: source → square@{a,b} (foreach over params) → total; `extra` is independent.
STEP_PY = """import pathlib, sys
op, *a = sys.argv[1:]
P = pathlib.Path
if op == "write":
    P(a[0]).write_text(a[1])
elif op == "mul":
    P(a[2]).write_text(str(int(P(a[0]).read_text()) * int(a[1])))
elif op == "sum":
    P(a[-1]).write_text(str(sum(int(P(p).read_text()) for p in a[:-1])))
elif op == "env":
    import os
    P(a[0]).write_text(os.environ.get(a[1], ""))
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
      total:
        cmd: {PY} step.py sum sq_a.txt sq_b.txt total.txt
        deps:
          - step.py
          - sq_a.txt
          - sq_b.txt
        outs:
          - total.txt
      extra:
        cmd: {PY} step.py env extra.txt OMP_NUM_THREADS
        outs:
          - extra.txt
    """
)
PARAMS = "items:\n  a:\n    k: 2\n  b:\n    k: 5\n"
EXPECTED_UPSTREAM = {
    "source": [],
    "square@a": ["source"],
    "square@b": ["source"],
    "total": ["square@a", "square@b"],
    "extra": [],
}



@pytest.fixture(scope="module")
def toy_repo(make_dvc_repo, dvc_env) -> Path:
    """A git + DVC repo with the toy dvc.yaml and params.yaml committed."""
    return make_dvc_repo("toy", {"dvc.yaml": DVC_YAML, "params.yaml": PARAMS, "step.py": STEP_PY})


def test_stage_graph_matches_dvc(toy_repo, dvc):
    from pipeline.orchestrate.graph import stage_graph

    graph = stage_graph(toy_repo)
    listed = dvc(toy_repo, "stage", "list", "--name-only").split()
    assert sorted(graph) == sorted(listed)
    assert graph == EXPECTED_UPSTREAM | {}  # same upstream edges
    order = list(graph)
    for name, ups in graph.items():  # topological: upstream first
        assert all(order.index(u) < order.index(name) for u in ups)


def test_select_stages_targets_and_groups(toy_repo):
    from pipeline.orchestrate.graph import select_stages

    graph = EXPECTED_UPSTREAM
    assert set(select_stages(graph, ["square@b"])) == {"source", "square@b"}
    assert set(select_stages(graph, ["square"])) == {"source", "square@a", "square@b"}
    assert set(select_stages(graph, [])) == set(graph)
    with pytest.raises(ValueError, match="valid stages: source"):
        select_stages(graph, ["nope"])


def test_parse_status():
    from pipeline.orchestrate.execution import parse_status

    assert parse_status("total", "Running stage 'total':\n> python ...") == "ran"
    assert parse_status("total", "Stage 'total' didn't change, skipping") == "skipped"
    assert parse_status("total", "Stage 'total' is cached - skipping run, checking out outputs") == "skipped"


def test_flow_runs_all_then_nothing(toy_repo, prefect_harness, dvc):
    from pipeline.flow import longtail_pipeline

    first = longtail_pipeline(repo_root=str(toy_repo), max_parallel=2)
    assert first == {name: "ran" for name in EXPECTED_UPSTREAM}
    assert (toy_repo / "total.txt").read_text() == str(3 * 2 + 3 * 5)
    assert json.loads(dvc(toy_repo, "status", "--json")) == {}
    # Two stages in parallel share the CPUs (an OMP_NUM_THREADS set by the user wins).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    assert (toy_repo / "extra.txt").read_text() == threads

    second = longtail_pipeline(repo_root=str(toy_repo))
    assert second == {name: "skipped" for name in EXPECTED_UPSTREAM}

    # An override changes one foreach item: only it and what depends on it run, in an isolated worktree saved as
    # a DVC experiment; the workspace keeps its params.yaml and outputs.
    params_before = (toy_repo / "params.yaml").read_bytes()
    third = longtail_pipeline(repo_root=str(toy_repo), overrides=["items.b.k=7"], targets=["total"], name="b7")
    assert third == {"source": "skipped", "square@a": "skipped", "square@b": "ran", "total": "ran"}
    assert (toy_repo / "params.yaml").read_bytes() == params_before
    assert (toy_repo / "total.txt").read_text() == str(3 * 2 + 3 * 5)
    assert json.loads(dvc(toy_repo, "status", "--json")) == {}
    exps = json.loads(dvc(toy_repo, "exp", "show", "--json"))
    saved = {e["name"]: e["data"] for x in exps[1]["experiments"] for e in x["revs"]}
    assert saved["b7"]["params"]["params.yaml"]["data"]["items"]["b"]["k"] == 7


def test_apply_overrides_like_dvc_exp_run(make_dvc_repo, dvc_env):
    """Hydra on: params.yaml is recomposed from conf/ + overrides (dvc's compose_and_dump); empty = untouched."""
    from pipeline.orchestrate.overrides import apply_overrides

    files = {
        "conf/config.yaml": "defaults:\n  - model: small\n  - _self_\nseed: 0\n",
        "conf/model/small.yaml": "width: 8\ndepth: 2\n",
        "conf/model/big.yaml": "width: 64\ndepth: 4\n",
        "params.yaml": "hand: edited\n",
    }
    repo = make_dvc_repo("hydra", files, config={"hydra.enabled": "true"}, commit=False)
    params = repo / "params.yaml"

    apply_overrides(repo, [])
    assert params.read_text() == "hand: edited\n"

    apply_overrides(repo, ["model=big", "seed=3", "+extra.lr=0.1"])
    import yaml

    assert yaml.safe_load(params.read_text()) == {"model": {"width": 64, "depth": 4}, "seed": 3, "extra": {"lr": 0.1}}
    with pytest.raises(ValueError, match="Sweep overrides"):
        apply_overrides(repo, ["seed=1,2"])


def test_retry_condition_only_for_lock_errors():
    from prefect.states import Failed

    from pipeline.flow import _retry_on_lock_error
    from pipeline.orchestrate.execution import StageFailedError, StageLockError

    assert _retry_on_lock_error(None, None, Failed(data=StageLockError("busy"))) is True
    assert _retry_on_lock_error(None, None, Failed(data=StageFailedError("exit 1"))) is False


def test_lock_error_is_detected(toy_repo, prefect_harness):
    """A live process holding the stage's output in DVC's rwlock → StageLockError (the retriable kind)."""
    from pipeline.flow import repro_stage
    from pipeline.orchestrate.execution import StageLockError

    blocker = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    rwlock = toy_repo / ".dvc" / "tmp" / "rwlock"
    try:
        rwlock.write_text(json.dumps({"write": {str(toy_repo / "extra.txt"): {"pid": blocker.pid, "cmd": "x"}}}))
        with pytest.raises(StageLockError, match="is busy"):
            repro_stage.with_options(retries=0)("extra", str(toy_repo), True)
    finally:
        blocker.kill()
        blocker.wait()
        rwlock.unlink(missing_ok=True)


def test_failing_stage_is_not_retried_and_stops_downstream(make_dvc_repo, dvc_env, prefect_harness):
    from pipeline.flow import longtail_pipeline
    from pipeline.orchestrate.execution import StageFailedError

    dvc_yaml = textwrap.dedent(
        f"""
        stages:
          fail:
            cmd: {PY} -c "open('attempts.log', 'a').write('x'); raise SystemExit(3)"
            outs:
              - fail.txt
          after:
            cmd: {PY} -c "open('after.txt', 'w').write('x')"
            deps:
              - fail.txt
            outs:
              - after.txt
        """
    )
    repo = make_dvc_repo("failing", {"dvc.yaml": dvc_yaml}, commit=False)
    with pytest.raises(StageFailedError, match="fail"):
        longtail_pipeline(repo_root=str(repo))
    assert (repo / "attempts.log").read_text() == "x"  # ran once: a failing command is not retried
    assert not (repo / "after.txt").exists()


def test_flow_parameter_schema_has_descriptions():
    from prefect.utilities.callables import parameter_schema

    from pipeline.flow import longtail_pipeline

    schema = parameter_schema(longtail_pipeline).model_dump_for_openapi()
    props = schema["properties"]
    assert {"overrides", "targets", "force", "max_parallel"} <= set(props)
    assert "dvc exp run -S" in props["overrides"]["description"]
    assert props["max_parallel"]["minimum"] == 1 and props["max_parallel"]["default"] == 2
