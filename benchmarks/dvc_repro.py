"""Wall time of a no-op ``dvc repro`` and a no-op ``python -m pipeline.orchestrate run -j 2`` on this repository.

Refuses to run unless ``dvc status`` reports everything up to date (a repro would otherwise train and write under
data/). Before and after, it records ``dvc status``, ``git status --porcelain`` and a fingerprint (path, size,
mtime) of data/, checkpoints/ and mlflow.db, and fails if any of them changed. Tracking is off for both commands,
so not even the MLflow store is opened. The full run from an empty data/ is ``benchmarks/full_run.py`` (in a
temporary copy).

``--copy`` measures instead in a temporary copy of the working tree whose outputs are placeholders recorded with
``dvc commit -f`` (no training; for a workspace without a complete data/), and also the runner of git ``HEAD``
(``--baseline-rev``) on the same copy, so that before and after come from the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, write_result

UP_TO_DATE = "Data and pipelines are up to date."
ENV = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "LONGTAIL_TRACKING": "off"}
COMMANDS = {"dvc repro": [str(ROOT / ".venv" / "bin" / "dvc"), "repro"],
            "orchestrate run -j 2": [sys.executable, "-m", "pipeline.orchestrate", "run", "-j", "2"]}


def sh(cmd: list[str], cwd: Path = ROOT) -> str:
    return subprocess.run(cmd, cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


def snapshot(root: Path = ROOT) -> dict:
    files = {}
    for top in ("data", "checkpoints", "mlflow.db"):
        paths = [root / top] if (root / top).is_file() else sorted((root / top).rglob("*"))
        for p in paths:
            if p.is_file():
                st = p.stat()
                files[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return {"dvc_status": sh([COMMANDS["dvc repro"][0], "status"], root).strip(),
            "git_status": sh(["git", "status", "--porcelain"], root), "files": files}


def timed(cmd: list[str], repeats: int, cwd: Path = ROOT) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sh(cmd, cwd)
        times.append(time.perf_counter() - t0)
    return times


def placeholder_copy(dst: Path) -> int:
    """The working tree (tracked and untracked files) in ``dst``, every stage output a placeholder recorded in
    ``dvc.lock`` and the cache by ``dvc commit -f``, committed to git. Returns the number of stages."""
    from dvc.repo import Repo

    files = sh(["git", "ls-files", "-co", "--exclude-standard"]).split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    (dst / "dvc.lock").unlink(missing_ok=True)
    sh(["git", "init", "-q"], dst)
    cwd = os.getcwd()
    os.chdir(dst)
    try:
        with Repo(str(dst)) as repo:
            stages = list(repo.index.stages)
            for stage in stages:
                for out in stage.outs:
                    path = dst / out.def_path
                    if path.suffix:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text("{}" if path.suffix == ".json" else stage.addressing)
                    else:
                        path.mkdir(parents=True, exist_ok=True)
                        (path / "out.txt").write_text(stage.addressing)
            repo.commit(None, force=True)
    finally:
        os.chdir(cwd)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "add", "-A"], [*git, "commit", "-q", "-m", "placeholders"]):
        sh(cmd, dst)
    return len(stages)


def baseline_command(rev: str, tmp: Path) -> list[str]:
    """The runner of git ``rev`` (its ``pipeline/`` package unpacked under ``tmp``), first on ``sys.path``."""
    tree = tmp / f"pipeline-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); from pipeline.orchestrate.local import main; "
            "raise SystemExit(main(['run', '-j', '2']))")
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy", action="store_true", help="measure in a placeholder copy (see above)")
    parser.add_argument("--baseline-rev", default="HEAD", help="with --copy: the git revision of the old runner")
    args = parser.parse_args()
    if args.copy:
        return main_copy(args)
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


def main_copy(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="dvc_repro_") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        n_stages = placeholder_copy(copy)
        before = snapshot(copy)
        if before["dvc_status"] != UP_TO_DATE:
            sys.exit(f"the placeholder copy is not up to date:\n{before['dvc_status']}")
        commands = {**COMMANDS, f"orchestrate run -j 2 ({args.baseline_rev})": baseline_command(args.baseline_rev,
                                                                                              Path(tmp))}
        results = {}
        for name, cmd in commands.items():
            ts = timed(cmd, args.repeats, copy)
            results[name] = {"wall_s_median": round(statistics.median(ts), 2), "wall_s": [round(t, 2) for t in ts]}
            print(f"no-op {name:30s} median {results[name]['wall_s_median']:.2f} s  runs {results[name]['wall_s']}")
        after = snapshot(copy)
        checks = {key: before[key] == after[key] for key in before}
        print(f"unchanged after the runs: {checks}")
        if not all(checks.values()):
            sys.exit("something changed during the no-op runs")
    ratio = results["orchestrate run -j 2"]["wall_s_median"] / results["dvc repro"]["wall_s_median"]
    print(f"orchestrate / dvc repro: {ratio:.2f}")
    write_result("dvc_repro_copy", {
        "command": f"PYTHONPATH=. .venv/bin/python benchmarks/dvc_repro.py --copy --repeats {args.repeats}",
        "stages": n_stages, "noop": results, "ratio_orchestrate_to_dvc_repro": round(ratio, 2), "unchanged": checks})


if __name__ == "__main__":
    main()
