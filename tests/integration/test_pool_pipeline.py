"""The project's own pipeline through a Prefect work pool, by the documented command (``make pool`` =
``scripts/pool.sh -- python -m pipeline.flow run --executor pool``): a Prefect server, a ``process`` pool, two workers
in two clones and a local-directory DVC remote, on a tiny config of every stage kind (two teachers, an index, a RAC
student, a rebalance, a memory edit, the upper bound, evaluate). The two teachers run on different workers, the
workspace is left as it was, and the run's report (a DVC experiment) equals a single-machine run's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import with_reads
from tests.integration.test_pipeline import tiny_params
from tests.pipeline.conftest import TEST_ENV
from tests.pipeline.test_pool import _experiments, _free_port

# soak: about 2.5 minutes of a real server and two workers, so `make test-soak` runs it, not `make test` (which
# keeps tests/pipeline/test_pool.py's two-worker teachers and override runs on the same pool machinery).
pytestmark = [pytest.mark.slow, pytest.mark.pipeline, pytest.mark.soak]

PY = sys.executable


def _params(repo: Path) -> dict:
    params = tiny_params(repo)
    params["teachers"] = {k: params["teachers"][k] for k in ("ce", "cb")}
    params["students"] = {"rac": params["students"]["rac"]}
    params["rebalance"] = {"ce-ncm": params["rebalance"]["ce-ncm"]}
    params["memory"] = {"rac-add_val": params["memory"]["rac-add_val"]}
    params["evaluate"]["ensembles"] = {}
    return params


def test_pool_runs_the_pipeline_like_one_machine(tmp_path: Path, copy_repo) -> None:
    import yaml

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo, {})
    (repo / "params.yaml").write_text(yaml.safe_dump(with_reads(_params(repo)), sort_keys=False))
    env = {**os.environ, **TEST_ENV, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "PYTHON": PY, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_PORT": str(_free_port()), "POOL_DIR": str(tmp_path / "pool"), "HF_HUB_OFFLINE": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LONGTAIL_PARENT_RUN_ID"):
        env.pop(key, None)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "tiny"], cwd=repo, env=env, check=True)
    cmd = ["bash", "scripts/pool.sh", "--", PY, "-m", "pipeline.flow", "run", "--executor", "pool", "-j", "2",
           "--name", "pooled"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    workers = dict(re.findall(r"\[([^\]]+)\] (?:ran|skipped) on (worker-\d)", log))
    assert {"teacher@ce", "teacher@cb", "evaluate"} <= set(workers), log[-3000:]
    assert workers["teacher@ce"] != workers["teacher@cb"], workers  # independent stages on different workers
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == "" and not (repo / "data/reports").exists()  # the workspace is as it was
    pooled = _experiments(repo, env)["pooled"]["metrics"]["data/reports/metrics.json"]["data"]

    # The same commit on one machine: every stage run again here (--force: not restored from the run cache).
    local = subprocess.run([PY, "-m", "pipeline.orchestrate", "run", "-j", "2", "--force"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    single = json.loads((repo / "data/reports/metrics.json").read_text())
    assert set(pooled["models"]) == set(single["models"]) and "students/rac:fused" in single["models"]
    for key in ("models", "gap_closed"):  # `dvc exp show` leaves out NaN values (a gap under a point)
        assert _finite(pooled[key]) == _finite(single[key]), key


def _finite(node):
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items() if v is not None and not (isinstance(v, float) and v != v)}
    return node
