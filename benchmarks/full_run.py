"""Wall time of the whole default pipeline from an empty ``data/``, in a temporary copy of the repository.

The copy holds the working tree's tracked and untracked (not ignored) files, as its own git repository, without
``dvc.lock``, ``data/`` or ``checkpoints/``; its ``params.yaml`` is composed from ``conf/`` with ``--override``s
(e.g. ``seeds=three``). It runs ``python -m pipeline.orchestrate run -j <jobs>`` exactly as ``make run`` does (or,
with ``--plain``, DVC's own sequential ``dvc repro``), with tracking off unless ``--tracking on``, and records the
wall time, the time of every stage as the runner reports it (``[<stage>] ran in <s> s``) and the report. This
repository's ``data/`` is never touched.

    PYTHONPATH=. .venv/bin/python benchmarks/full_run.py                         # the default run: one seed
    PYTHONPATH=. .venv/bin/python benchmarks/full_run.py --override seeds=three  # three seeds
    PYTHONPATH=. .venv/bin/python benchmarks/full_run.py --plain                 # plain `dvc repro`, one at a time
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, write_result  # noqa: E402
from pipeline.compose import compose, dump  # noqa: E402

STAGE_TIME = re.compile(r"\[([^\]]+)\] ran in ([0-9.]+) s")


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and f != "dvc.lock":
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--override", action="append", default=[], help="a Hydra override of conf/ (repeatable)")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--tracking", choices=("on", "off"), default="off")
    parser.add_argument("--plain", action="store_true", help="time plain `dvc repro` (sequential) instead")
    parser.add_argument("--keep", type=Path, help="run in this (new) directory and keep it, instead of a temporary one")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="full_run_"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"{work} is not empty")
    copy_tree(work)
    dump(compose(work / "conf", args.override), work / "params.yaml")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(work),
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "LONGTAIL_TRACKING": args.tracking,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = ([str(ROOT / ".venv" / "bin" / "dvc"), "repro"] if args.plain
           else [sys.executable, "-m", "pipeline.orchestrate", "run", "-j", str(args.jobs)])
    print(f"running {' '.join(cmd)} in {work} (overrides: {args.override or 'none'})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (work / "run.log").write_text(log)
    if proc.returncode != 0:
        sys.exit(f"the run failed after {wall:.0f} s; its log: {work / 'run.log'}\n{log[-2000:]}")
    stages = {name: float(s) for name, s in STAGE_TIME.findall(log)}  # the runner's lines (none with --plain)
    name = "full_run" + ("_plain" if args.plain else "") + "".join(f"_{o.replace('=', '-')}" for o in args.override)
    RESULTS.mkdir(exist_ok=True)
    shutil.copy(work / "data/reports/summary.md", RESULTS / f"{name}_summary.md")
    write_result(name, {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/full_run.py" + (" --plain" if args.plain else "")
        + "".join(f" --override {o}" for o in args.override),
        "runner": " ".join(cmd[-2:] if args.plain else cmd[1:]), "overrides": args.override, "jobs": args.jobs,
        "tracking": args.tracking, "wall_s": round(wall, 1),
        "stages_ran": len(stages) or len(re.findall(r"Running stage '", log)), "stage_s": stages,
        "report": json.loads((work / "data/reports/metrics.json").read_text())["seeds"]})
    n = len(stages) or len(re.findall(r"Running stage '", log))
    print(f"{n} stages in {wall // 60:.0f} min {wall % 60:.0f} s; summary: "
          f"{(RESULTS / f'{name}_summary.md').relative_to(ROOT)}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
