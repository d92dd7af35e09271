"""Import cost of each stage kind against a bare ``import torch``: what a stage process pays before its first step.

For each kind, a fresh ``python -X importtime`` imports exactly the modules that stage's ``main`` imports (its script,
then the ``pipeline`` modules it imports inside ``main``), plus ``mlflow`` where tracking is on (the default run).
Reports the median wall time of ``repeats`` runs and, from one ``-X importtime`` trace, the cumulative time of the
heavy packages and which module imports each of them first (where a lazy import would go). Nothing is trained.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from benchmarks._common import ROOT, write_result

TRAIN = ["stages.teacher", "pipeline.build", "pipeline.train.run", "pipeline.train.methods"]
KINDS = {
    "import torch": ["torch"],
    "teacher / student / upper_bound": TRAIN,
    "index": ["stages.index", "pipeline.build", "pipeline.index.memory", "pipeline.index.encoders",
              "pipeline.data.datasets", "pipeline.tracking"],
    "rebalance": ["stages.rebalance", "pipeline.build", "pipeline.rebalance"],
    "memory": ["stages.memory", "pipeline.build", "pipeline.memory"],
    "evaluate": ["stages.evaluate", "pipeline.build", "pipeline.data", "pipeline.evaluate.plots",
                 "pipeline.evaluate.report", "pipeline.tracking"],
    "mlflow (tracking on)": ["mlflow", "mlflow.tracking"],
}
HEAVY = ["torch", "torchvision", "timm", "open_clip", "faiss", "mlflow", "pandas", "matplotlib", "sklearn", "scipy",
         "huggingface_hub", "safetensors", "pipeline.build", "pipeline.index", "pipeline.tracking"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "LONGTAIL_TRACKING": "off",
       "MLFLOW_DISABLE_TELEMETRY": "true"}
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


def code(modules: list[str]) -> str:
    return "; ".join(f"import {m}" for m in modules)


def wall(modules: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code(modules)], cwd=ROOT, env=ENV, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def trace(modules: list[str]) -> dict[str, dict]:
    """``{heavy package: {"cumulative_s", "imported_by"}}`` from one ``-X importtime`` run."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code(modules)], cwd=ROOT, env=ENV, check=True,
                         capture_output=True, text=True).stderr
    rows = [(int(m[2]), len(m[3]), m[4]) for m in map(LINE.match, err.splitlines()) if m]
    out = {}
    for i, (cum, depth, name) in enumerate(rows):
        if name in HEAVY and name not in out:
            parent = next((n for _, d, n in rows[i + 1:] if d < depth), "<top>")
            out[name] = {"cumulative_s": round(cum / 1e6, 2), "imported_by": parent}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for kind, modules in KINDS.items():
        ts = wall(modules, args.repeats)
        results[kind] = {"modules": modules, "wall_s_median": round(statistics.median(ts), 2),
                         "wall_s": [round(t, 2) for t in ts], "heavy": trace(modules)}
        heavy = ", ".join(f"{k} {v['cumulative_s']} s (by {v['imported_by']})"
                          for k, v in results[kind]["heavy"].items())
        print(f"{kind:32s} {results[kind]['wall_s_median']:.2f} s  {heavy}")
    base = results["import torch"]["wall_s_median"]
    for r in results.values():
        r["over_import_torch_s"] = round(r["wall_s_median"] - base, 2)
    write_result("stage_imports", {"command": f"PYTHONPATH=. .venv/bin/python benchmarks/stage_imports.py "
                                              f"--repeats {args.repeats}", "kinds": results})


if __name__ == "__main__":
    main()
