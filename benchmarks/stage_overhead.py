"""An executed stage's overhead against a bare ``python -c "import torch"``, per stage kind, in one run.

A stage process pays for its interpreter, imports, config, data and model building, MLflow run and logging, and its
output writing, around its work. For the kinds that train (teacher, student, upper bound, cRT / LWS rebalance) the
work is the span of training epochs the stage's ``Trainer`` records (``train_started_at`` / ``train_ended_at`` in
``data/timings/<stage>.json``), and the overhead is

    (first epoch's start - process start) + (process exit - last epoch's end)

which includes the export: the predictions on train, val and test the stage writes for evaluate. The other kinds
(index, τ-normalisation, memory edit, evaluate, dataset) have no training step, so their whole wall time is listed.

Every stage runs on the default run's data in a temporary copy of this repository (``data/`` copied from this
workspace, so run ``make run`` first), with its training entries shortened to 2 epochs and no checkpoint to resume
from, as ``python -m stages.<kind>`` (not through DVC: DVC's own cost is ``benchmarks/dvc_repro.py``). Kinds and
``import torch`` are interleaved, ``repeats`` rounds, medians reported. Tracking is on, as in the default run: the
stage writes its MLflow journal, which the runner replays in its own process (``--tracking journal``, the default);
``--tracking direct`` logs to MLflow from the stage (``dvc repro`` by hand), ``--tracking off`` uses the NullTracker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, write_result  # noqa: E402
from benchmarks.full_run import copy_tree  # noqa: E402
from pipeline.tracking import JOURNAL_ENV  # noqa: E402

EPOCHS = 2
#: kind → (module, arguments, DVC stage name, whether it trains)
KINDS = {
    "teacher": ("stages.teacher", ["--name", "ce"], "teacher@ce", True),
    "student (CBD)": ("stages.student", ["--name", "cbd"], "student@cbd", True),
    "upper_bound": ("stages.upper_bound", [], "upper_bound", True),  # the teachers.ce recipe
    "rebalance (cRT)": ("stages.rebalance", ["--name", "ce-crt"], "rebalance@ce-crt", True),
    "rebalance (tau_norm)": ("stages.rebalance", ["--name", "ce-tau_norm"], "rebalance@ce-tau_norm", False),
    "index": ("stages.index", ["--name", "ce"], "index@ce", False),
    "memory": ("stages.memory", ["--name", "rac-add_val"], "memory@rac-add_val", False),
    "evaluate": ("stages.evaluate", [], "evaluate", False),
    "dataset": ("stages.dataset", [], "dataset", False),
}
SHORTENED = [("teachers", "ce"), ("students", "cbd"), ("rebalance", "ce-crt")]  # trained for EPOCHS epochs


def prepare(work: Path) -> None:
    """A copy of the repository with this workspace's ``data/`` and shortened training entries."""
    copy_tree(work)
    if not (ROOT / "data" / "reports" / "metrics.json").is_file():
        sys.exit("data/ has no outputs: run `make run` first")
    shutil.copytree(ROOT / "data", work / "data", ignore=shutil.ignore_patterns("timings"), dirs_exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, name in SHORTENED:
        entry = params[section][name]
        entry.get("train", entry)["epochs"] = EPOCHS  # a rebalance entry holds its head's training under train
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-c", "from pipeline.tracking import init_store; init_store('.')"], cwd=work,
                   check=True, env={**os.environ, "PYTHONPATH": str(work)})


def run_once(work: Path, kind: str, env: dict, journal: bool) -> dict:
    if kind == "import torch":
        cmd = [sys.executable, "-c", "import torch"]
    else:
        module, args, stage, _ = KINDS[kind]
        cmd = [sys.executable, "-m", module, *args]
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # train from scratch, never resume
        if journal:  # a fresh journal per execution, as the runner gives each stage (replayed by no one here)
            shutil.rmtree(work / ".journal", ignore_errors=True)
            env = {**env, JOURNAL_ENV: str(work / ".journal")}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    t1 = time.time()
    if proc.returncode:
        sys.exit(f"{kind}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = {"wall_s": t1 - t0}
    if kind != "import torch" and KINDS[kind][3]:
        timings = json.loads((work / "data" / "timings" / f"{KINDS[kind][2]}.json").read_text())
        out["before_first_epoch_s"] = timings["train_started_at"] - t0
        out["after_last_epoch_s"] = t1 - timings["train_ended_at"]
        out["export_s"] = timings["export_time_s"]
        out["overhead_s"] = out["before_first_epoch_s"] + out["after_last_epoch_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tracking", choices=("journal", "direct", "off"), default="journal")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), help=f"subset of: {', '.join(KINDS)}")
    args = parser.parse_args()
    env = {**os.environ, "LONGTAIL_TRACKING": "off" if args.tracking == "off" else "on", "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "LONGTAIL_LOG_LEVEL": "WARNING"}
    for var in ("MLFLOW_TRACKING_URI", JOURNAL_ENV):
        env.pop(var, None)
    kinds = ["import torch", *args.kinds]
    samples: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="stage_overhead_") as tmp:
        work = Path(tmp)
        prepare(work)
        env["PYTHONPATH"] = str(work)
        for r in range(args.repeats):
            for kind in kinds:
                samples[kind].append(run_once(work, kind, env, args.tracking == "journal"))
                print(f"round {r + 1}/{args.repeats} {kind:22s} " + " ".join(
                    f"{k}={v:.2f}" for k, v in samples[kind][-1].items()), flush=True)
    medians = {k: {m: round(statistics.median(s[m] for s in runs), 2) for m in runs[0]} for k, runs in samples.items()}
    torch_s = medians["import torch"]["wall_s"]
    print(f"\n{'kind':22s} {'wall':>7s} {'overhead':>9s} {'- torch':>8s}  (before first epoch / after last; export)")
    for kind, m in medians.items():
        base = m.get("overhead_s", m["wall_s"])
        m["over_import_torch_s"] = round(base - torch_s, 2)
        detail = (f"  ({m['before_first_epoch_s']:.2f} / {m['after_last_epoch_s']:.2f}; {m['export_s']:.2f})"
                  if "overhead_s" in m else "")
        print(f"{kind:22s} {m['wall_s']:7.2f} {m.get('overhead_s', float('nan')):9.2f} "
              f"{m['over_import_torch_s']:8.2f}{detail}")
    write_result(f"stage_overhead_tracking-{args.tracking}", {
        "command": f"PYTHONPATH=. .venv/bin/python benchmarks/stage_overhead.py --repeats {args.repeats} "
                   f"--tracking {args.tracking}",
        "epochs_per_training_stage": EPOCHS, "tracking": args.tracking, "median": medians,
        "samples": {k: [{m: round(v, 3) for m, v in s.items()} for s in runs] for k, runs in samples.items()},
    })


if __name__ == "__main__":
    main()
