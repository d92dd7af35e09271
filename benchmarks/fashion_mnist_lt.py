"""The Fashion-MNIST-LT benchmark: CIFAR-10-LT's protocol on real images, every method of the default pipeline.

``make bench-fashion`` runs this script. It

1. finds Fashion-MNIST's four idx files under ``/usr/share/datasets/fashion-mnist``; when they are missing it runs
   ``apt-get install dataset-fashion-mnist`` as root, and otherwise stops with one line saying how to get them;
2. lays a copy of the repository in ``--work`` (default ``.bench/fashion_mnist_lt``, ignored by git; an existing one is
   reused, so an interrupted benchmark resumes: DVC skips finished stages and a training stage resumes from its
   last checkpoint), composes its ``params.yaml`` from ``conf/`` with ``dataset=fashion_mnist_lt
   teachers=fashion_lt students=fashion_lt`` (plus ``--override``\\ s) and runs the pipeline there exactly as
   ``make run`` does (``python -m pipeline.orchestrate run -j 2``), one seed: the timed part;
3. trains the seed replicas 1 and 2 of ``--seed-models`` (default the CE teacher, LDAM-DRW and balanced softmax:
   the baseline and the claims within a few points of it; the other claims differ by far more than CE's seed
   spread) and re-runs ``evaluate``, which reports mean ± std over the seeds it finds;
4. writes the report (``benchmarks/fashion_mnist_lt_report.py``): the table with 95 % intervals from the 10,000
   test images, the claims of the five papers, the per-stage wall times, into ``benchmarks/results/``.

This repository's ``data/``, ``params.yaml`` and ``dvc.lock`` are never touched.

    PYTHONPATH=. .venv/bin/python benchmarks/fashion_mnist_lt.py
    PYTHONPATH=. .venv/bin/python benchmarks/fashion_mnist_lt.py --override dataset.imbalance_factor=10 \\
        --work .bench/if10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, write_result  # noqa: E402
from benchmarks.full_run import STAGE_TIME, copy_tree  # noqa: E402
from pipeline.compose import compose, dump  # noqa: E402

FILES_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
GROUPS = ["dataset=fashion_mnist_lt", "teachers=fashion_lt", "students=fashion_lt"]
SEED_MODELS = ["teacher@ce", "teacher@ldam_drw", "teacher@bs"]


def missing_files(root: Path) -> list[str]:
    return [f for f in FILES if not (root / f).is_file() and not (root / f"{f}.gz").is_file()]


def ensure_data(root: Path) -> None:
    """The idx files under ``root``; installs Debian's package as root when they are missing, else exits."""
    if not missing_files(root):
        return
    if root == FILES_DIR and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing Debian's dataset-fashion-mnist (apt-get) ...", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]):
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ,
                                                                              "DEBIAN_FRONTEND": "noninteractive"})
    if missing_files(root):
        sys.exit(f"Fashion-MNIST not found under {root}: run `apt-get install dataset-fashion-mnist` as root "
                 f"(Debian), or pass --override dataset.download=true where a network exists")


def run_logged(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, str]:
    """Run ``cmd``, echoing its output (the stages' progress) and appending it to ``log``; (exit code, output)."""
    lines = []
    with log.open("a") as f, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            lines.append(line)
    return proc.returncode, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "fashion_mnist_lt")
    parser.add_argument("--override", action="append", default=[], help="a further Hydra override (repeatable)")
    parser.add_argument("--seed-models", nargs="*", default=SEED_MODELS,
                        help="stages (teacher@<name>, student@<name>, rebalance@<name>) to train again with seeds "
                             "+1 and +2; none: skip")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--tracking", choices=("on", "off"), default="off")
    args = parser.parse_args()

    root = next((Path(o.split("=", 1)[1]) for o in args.override if o.startswith("dataset.root=")), FILES_DIR)
    if not any(o == "dataset.download=true" for o in args.override):
        ensure_data(root)
    work = args.work.resolve()
    if not (work / ".git").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        copy_tree(work)
    overrides = [*GROUPS, *args.override]
    dump(compose(work / "conf", overrides), work / "params.yaml")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(work),
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "LONGTAIL_TRACKING": args.tracking,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = work / "bench.log"
    runner = [sys.executable, "-m", "pipeline.orchestrate", "run", "-j", str(args.jobs)]
    print(f"running the pipeline in {work} ({' '.join(overrides)}); log: {log}", flush=True)
    t0 = time.perf_counter()
    code, out = run_logged(runner, work, env, log)
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"the pipeline failed after {wall:.0f} s; its log: {log}")
    stages = {name: float(s) for name, s in STAGE_TIME.findall(out)}
    timed = work / "one_seed.json"  # the timing of the run that trained the stages, kept across resumed runs
    if stages:
        timed.write_text(json.dumps({"wall_s": round(wall, 1), "stage_s": stages}, indent=2) + "\n")
    elif timed.is_file():  # everything was up to date: report the run that did the work
        earlier = json.loads(timed.read_text())
        wall, stages = earlier["wall_s"], earlier["stage_s"]

    seed_wall, seed_stages = 0.0, {}
    if args.seed_models:
        dump(compose(work / "conf", [*overrides, "seeds=three"]), work / "params.yaml")
        targets = [f"{m.replace('@', '_seed@', 1)}-{k}" for m in args.seed_models for k in (1, 2)]
        print(f"seed replicas: {' '.join(targets)}", flush=True)
        t1 = time.perf_counter()
        code, out = run_logged([*runner, *(a for t in targets for a in ("-t", t))], work, env, log)
        if code == 0:
            code, _ = run_logged([str(ROOT / ".venv" / "bin" / "dvc"), "repro", "--single-item", "evaluate"], work,
                                 env, log)
        seed_wall = time.perf_counter() - t1
        if code != 0:
            sys.exit(f"the seed replicas failed after {seed_wall:.0f} s; log: {log}")
        seed_stages = {name: float(s) for name, s in STAGE_TIME.findall(out)}

    name = "fashion_mnist_lt" + "".join(f"_{o.replace('=', '-')}" for o in args.override)
    result = write_result(name, {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/fashion_mnist_lt.py"
        + "".join(f" --override {o}" for o in args.override),
        "overrides": overrides, "jobs": args.jobs, "tracking": args.tracking,
        "wall_s": round(wall, 1), "stage_s": stages, "stages_ran": len(stages),
        "seed_models": args.seed_models, "seed_wall_s": round(seed_wall, 1), "seed_stage_s": seed_stages,
    })
    print(f"one seed: {len(stages)} stages in {wall // 60:.0f} min {wall % 60:.0f} s; seed replicas: "
          f"{seed_wall // 60:.0f} min {seed_wall % 60:.0f} s", flush=True)
    from benchmarks.fashion_mnist_lt_report import write_report

    report = write_report(work / "data", result, RESULTS / f"{name}.md")
    print(report)


if __name__ == "__main__":
    main()
