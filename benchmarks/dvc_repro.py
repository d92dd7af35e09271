"""Wall time of a no-op ``dvc repro`` and a no-op ``python -m pipeline.orchestrate run -j 2`` on this repository.

Refuses to run unless ``dvc status`` reports everything up to date (a repro would otherwise train and write under
data/). Before and after, it records ``dvc status``, ``git status --porcelain`` and a fingerprint (path, size,
mtime) of data/, checkpoints/ and mlflow.db, and fails if any of them changed. Tracking is off for both commands,
so not even the MLflow store is opened. The full run from an empty data/ is ``benchmarks/full_run.py`` (in a
temporary copy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks._common import ROOT, write_result

UP_TO_DATE = "Data and pipelines are up to date."
ENV = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "LONGTAIL_TRACKING": "off"}
COMMANDS = {"dvc repro": [str(ROOT / ".venv" / "bin" / "dvc"), "repro"],
            "orchestrate run -j 2": [sys.executable, "-m", "pipeline.orchestrate", "run", "-j", "2"]}


def sh(cmd: list[str]) -> str:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, text=True).stdout


def snapshot() -> dict:
    files = {}
    for top in ("data", "checkpoints", "mlflow.db"):
        paths = [ROOT / top] if (ROOT / top).is_file() else sorted((ROOT / top).rglob("*"))
        for p in paths:
            if p.is_file():
                st = p.stat()
                files[str(p.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns)
    return {"dvc_status": sh([COMMANDS["dvc repro"][0], "status"]).strip(),
            "git_status": sh(["git", "status", "--porcelain"]), "files": files}


def timed(cmd: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sh(cmd)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    before = snapshot()
    if before["dvc_status"] != UP_TO_DATE:
        sys.exit(f"dvc status is not clean, refusing to repro (it would write data/):\n{before['dvc_status']}")
    results = {}
    for name, cmd in COMMANDS.items():
        ts = timed(cmd, args.repeats)
        results[name] = {"command": " ".join([".venv/bin/dvc repro"] if name == "dvc repro" else
                                             ["PYTHONPATH=.", ".venv/bin/python", *cmd[1:]]),
                         "wall_s_median": round(statistics.median(ts), 2), "wall_s": [round(t, 2) for t in ts]}
        print(f"no-op {name:22s} median {results[name]['wall_s_median']:.2f} s  runs {results[name]['wall_s']}")
    after = snapshot()
    checks = {key: before[key] == after[key] for key in before}
    print(f"unchanged after the runs: {checks}; dvc status: {after['dvc_status']!r}")
    if not all(checks.values()):
        sys.exit("something changed during the no-op runs")
    write_result("dvc_repro", {
        "command": f"PYTHONPATH=. .venv/bin/python benchmarks/dvc_repro.py --repeats {args.repeats}",
        "noop": results, "unchanged": checks, "files_fingerprinted": len(before["files"])})


if __name__ == "__main__":
    main()
