"""The whole DVC pipeline on a tiny config, in a temporary copy of the repository.

Checks the stage contracts end to end (run as ``make run`` runs them, two stages at a time): the table and metrics,
one MLflow run per stage execution, a second plain ``dvc repro`` that runs nothing, a changed teacher setting that
reruns only its branch, and a teacher killed with SIGKILL mid-training (process group, as a preempted worker) that
resumes from its checkpoint to the same weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import with_reads

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONPATH=str(repo), DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", LONGTAIL_TRACKING="on")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LONGTAIL_PARENT_RUN_ID", None)
    return env


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=_env(repo), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_pipeline(repo: Path) -> subprocess.CompletedProcess:
    """What ``make run`` does: every stage as ``dvc --wait-for-lock repro -s``, two at a time."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.orchestrate", "run", "-j", "2"], cwd=repo, env=_env(repo),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"pipeline.orchestrate run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def tiny_params(repo: Path, **overrides: object) -> dict:
    """The composed params with every training shortened to at most 2 epochs (and the given dotted overrides)."""
    sys.path.insert(0, str(repo))
    from pipeline.compose import compose

    params = compose(repo / "conf")

    def shorten(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("epochs"), int):
                node["epochs"] = min(node["epochs"], 2)
            for v in node.values():
                shorten(v)

    shorten(params)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = params
        for p in path:
            node = node[p]
        node[last] = value
    return params


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(with_reads(params), sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, copy_repo) -> Path:
    """A copy of the working tree (tracked and untracked, not ignored files) as its own git + DVC repo."""
    dst = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo", {})
    write_params(dst, tiny_params(dst))
    subprocess.run([sys.executable, "-c", "from pipeline.tracking import init_store; init_store('.')"], cwd=dst,
                   env=_env(dst), check=True)
    return dst


@pytest.fixture(scope="module")
def first_run(repo: Path) -> subprocess.CompletedProcess:
    return run_pipeline(repo)


def test_pipeline_writes_the_table_for_every_model(repo: Path, first_run: subprocess.CompletedProcess) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    stages = ran_stages(first_run.stdout)
    expected = {"dataset", "evaluate", *(f"teacher@{k}" for k in params["teachers"]),
                *(f"student@{k}" for k in params["students"]), *(f"rebalance@{k}" for k in params["rebalance"]),
                *(f"index@{k}" for k in params["index"]), *(f"memory@{k}" for k in params["memory"]), "upper_bound"}
    assert set(stages) == expected
    metrics = json.loads((repo / "data/reports/metrics.json").read_text())
    models = metrics["models"]
    heads = {"deit_lt": ("avg", "cls", "dist"), "rac": ("fused", "base", "retrieval")}  # one row per head
    for kind, key in (("teachers", "teachers"), ("students", "students"), ("rebalance", "rebalance")):
        for name in params[key]:
            method = params[key][name].get("method")
            rows = [f"{kind}/{name}:{h}" for h in heads[method]] if method in heads else [f"{kind}/{name}"]
            for row in rows:
                assert set(models[row]) == {"all", "many", "medium", "few"}
    for name, entry in params["memory"].items():  # the trained RAC student against a changed memory
        assert {f"memory/{name}:{h}" for h in heads["rac"]} <= set(models)
        scored = json.loads((repo / f"data/memory/{name}/metrics.json").read_text())
        assert scored["model"] == f"students/{entry['model']}"
    for name, student in params["students"].items():
        if student["method"] in heads:
            assert (repo / f"data/reports/plots/heads_students_{name}.png").is_file()
    for name in params["index"]:
        assert {f"index/{name}:knn", f"index/{name}:nn"} <= set(models)
    for acc in models.values():
        assert 0.0 <= acc["all"] <= 1.0
    bound = f"upper_bound/{params['upper_bound']['recipe']}"  # the balanced run and the gap each model closes
    assert bound in models and metrics["gap_closed"]["upper_bound"] == bound
    assert set(metrics["gap_closed"]["models"]) == set(models)
    summary = (repo / "data/reports/summary.md").read_text()
    assert "| teachers/ce |" in summary and "many" in summary
    for png in ("per_class_accuracy.png", "split_accuracy.png", "class_counts.png"):
        assert (repo / "data/reports/plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads((repo / f"data/index/{next(iter(params['index']))}/stats.json").read_text())
    assert 0.0 <= stats["splits"]["test"][f"recall_at_{stats['k']}"] <= 1.0


def test_one_mlflow_run_per_stage_execution(repo: Path, first_run: subprocess.CompletedProcess) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["longtail-pipeline"])
    assert sorted(runs["tags.stage"]) == sorted(ran_stages(first_run.stdout))
    teacher = runs[runs["tags.stage"] == "teacher@ce"].iloc[0]
    assert teacher["params.method"] == "erm" and teacher["status"] == "FINISHED"
    assert 0.0 <= teacher["metrics.test/all"] <= 1.0
    assert not runs["tags.model"].isna().all()


def test_second_repro_does_nothing(repo: Path, first_run: subprocess.CompletedProcess) -> None:
    t0 = time.perf_counter()
    out = dvc(repo, "repro").stdout
    assert ran_stages(out) == []
    assert time.perf_counter() - t0 < 60


def test_a_seed_replica_trains_apart_and_joins_the_report(repo: Path, first_run: subprocess.CompletedProcess) -> None:
    """seeds.replicas=[1]: the replica stages of the CE teacher and the upper bound write under data/seeds/1 with
    seed + 1 and leave every primary stage up to date; the report then gives those rows over two seeds."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    write_params(repo, {**params, "seeds": {"replicas": [1]}})
    try:
        for stage in ("teacher_seed@ce-1", "upper_bound_seed@1", "evaluate"):
            assert ran_stages(dvc(repo, "repro", "--single-item", stage).stdout) == [stage]
        status = json.loads(dvc(repo, "status", "--json").stdout)
        assert not any("_seed@" not in name and name != "evaluate" for name in status), status  # primary unchanged
        replica = json.loads((repo / "data/seeds/1/teachers/ce/metrics.json").read_text())
        primary = json.loads((repo / "data/teachers/ce/metrics.json").read_text())
        weights = [_state(repo / root / "teachers/ce/model.pt") for root in ("data", "data/seeds/1")]
        assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # another seed, another run
        assert not (repo / "data/teachers/ce-1").exists() and (repo / "checkpoints/seeds/1/teachers/ce").is_dir()
        metrics = json.loads((repo / "data/reports/metrics.json").read_text())
        for row in ("teachers/ce", "upper_bound/ce"):
            assert metrics["seeds"][row]["n"] == 2 and metrics["seeds"][row]["seeds"] == [0, 1]
            values = [primary["test"]["main"]["all"], replica["test"]["main"]["all"]] if row == "teachers/ce" else None
            if values:
                assert metrics["seeds"][row]["all"]["values"] == pytest.approx(values)
        assert metrics["seeds"]["teachers/cb"]["n"] == 1
        assert (repo / "data/reports/plots/seeds.png").is_file()
        assert "| teachers/ce | 2 |" in (repo / "data/reports/summary.md").read_text()
        import mlflow  # the evaluate run's seed table, as a user opens it in MLflow

        mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
        runs = mlflow.search_runs(experiment_names=["longtail-pipeline"], filter_string="tags.stage = 'evaluate'",
                                  order_by=["attributes.start_time DESC"])
        table = mlflow.artifacts.load_dict(f"runs:/{runs.iloc[0]['run_id']}/tables/seeds.json")  # columns + data
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        ce = next(row for row in rows if row["model"] == "teachers/ce")
        assert ce["seeds"] == 2 and ce["all_mean"] == pytest.approx(metrics["seeds"]["teachers/ce"]["all"]["mean"])
        replica_runs = mlflow.search_runs(experiment_names=["longtail-pipeline"],
                                          filter_string="tags.seed_replica = '1'")
        assert sorted(replica_runs["tags.stage"]) == ["teacher_seed@ce-1", "upper_bound_seed@1"]
    finally:
        write_params(repo, params)


def test_changing_one_teacher_reruns_only_its_branch(repo: Path, first_run: subprocess.CompletedProcess) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["teachers"]["ce"]["optimizer"]["lr"] = 0.05
    write_params(repo, params)
    stages = set(ran_stages(run_pipeline(repo).stdout))
    assert "teacher@ce" in stages and "evaluate" in stages
    assert "dataset" not in stages
    assert not any(s.startswith("teacher@") and s != "teacher@ce" for s in stages)
    dependents = {f"rebalance@{k}" for k, v in params["rebalance"].items() if v["model"] == "teachers/ce"}
    assert dependents <= stages
    # rebalanced teachers other than ce stay; rebalanced students rerun (a student depends on data/teachers)
    unrelated = {f"rebalance@{k}" for k, v in params["rebalance"].items()
                 if v["model"].startswith("teachers/") and v["model"] != "teachers/ce"}
    assert not unrelated & stages


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_sigkill_mid_training_resumes_to_the_same_weights(repo: Path, first_run: subprocess.CompletedProcess) -> None:
    params = tiny_params(repo, **{"teachers.ce.epochs": 6})
    write_params(repo, params)
    dvc(repo, "repro", "teacher@ce")
    reference = _state(repo / "data/teachers/ce/model.pt")
    shutil.rmtree(repo / "checkpoints/teachers/ce")
    shutil.rmtree(repo / "data/teachers/ce")
    ckpt = repo / "checkpoints/teachers/ce/checkpoint.pt"
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "--no-run-cache", "teacher@ce"], cwd=repo, env=_env(repo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 2):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 2 <= done < 6, "the kill must land mid-training"
    cleared = subprocess.run([sys.executable, "-m", "pipeline.dvc_locks"], cwd=repo, env=_env(repo),
                             capture_output=True, text=True, check=True)
    out = dvc(repo, "repro", "teacher@ce")
    assert f"resuming from checkpoint checkpoints/teachers/ce/checkpoint.pt after epoch {done}" in out.stderr + \
        out.stdout + cleared.stdout
    resumed = _state(repo / "data/teachers/ce/model.pt")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
