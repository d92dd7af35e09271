"""The Fashion-MNIST-LT report: accuracies with 95 % intervals, the papers' claims, the seed spread, stage times.

Reads a finished benchmark's ``data/`` (``benchmarks/fashion_mnist_lt.py``): every model's test predictions, the
evaluate stage's ``reports/metrics.json`` (seed statistics, gap closed) and the manifest. Writes one Markdown file.

    PYTHONPATH=. .venv/bin/python benchmarks/fashion_mnist_lt_report.py .bench/fashion_mnist_lt/data \
        benchmarks/results/fashion_mnist_lt.json benchmarks/results/fashion_mnist_lt.md

Intervals (:mod:`pipeline.evaluate.intervals`): an accuracy's is the Wilson interval over the test images of its
group (1,000 per class); a claim's is the paired interval of the difference of two models on the same images.
A claim **holds** when its difference has the paper's sign and its interval excludes 0, **reversed** when the
interval excludes 0 on the other side, and is **not resolved** otherwise. Where the models of a claim have three
seeds, the seed means and the unpaired two-standard-error screen of the evaluate stage are given beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate.intervals import paired_difference, wilson_interval  # noqa: E402
from pipeline.evaluate.report import GROUPS, collect_outputs  # noqa: E402

# (claim, paper and what its number is, model A, model B, group, expected sign of A − B)
CLAIMS = [
    ("LDAM-DRW over CE", "CIFAR-10-LT: 77.0 vs 70.4 (+6.7; LDAM-DRW paper, errors 22.97 vs 29.64)",
     "teachers/ldam_drw", "teachers/ce", "all", 1),
    ("LDAM-DRW over CE, few-shot", "(the gain comes from the tail classes)", "teachers/ldam_drw", "teachers/ce",
     "few", 1),
    ("SAM on top of LDAM-DRW", "CIFAR-10-LT: 81.9 vs 77.0 (+4.9; Saddle-LongTail)", "teachers/ldam_drw_sam",
     "teachers/ldam_drw", "all", 1),
    ("cRT over jointly trained CE", "ImageNet-LT X50: 49.6 vs 44.4 (+5.2; Decoupling)", "rebalance/ce-crt",
     "teachers/ce", "all", 1),
    ("cRT over CE, few-shot", "ImageNet-LT few: 27.4 vs 7.7 (+19.7)", "rebalance/ce-crt", "teachers/ce", "few", 1),
    ("τ-norm over jointly trained CE", "ImageNet-LT X50: 49.4 vs 44.4 (+5.0)", "rebalance/ce-tau_norm",
     "teachers/ce", "all", 1),
    ("τ-norm over CE, few-shot", "ImageNet-LT few: 30.7 vs 7.7 (+23.0)", "rebalance/ce-tau_norm", "teachers/ce",
     "few", 1),
    ("PaCo over CE", "CIFAR-100-LT: 52.0 vs 38.3 (+13.7; CE: LDAM-DRW paper's ERM)", "teachers/paco",
     "teachers/ce", "all", 1),
    ("PaCo over balanced softmax", "CIFAR-100-LT: 52.0 vs 50.8 (+1.2; PaCo paper)", "teachers/paco",
     "teachers/bs", "all", 1),
    ("CBD student over its teacher", "ImageNet-LT R50: the student beats the teacher it distils",
     "students/cbd", "teachers/ce", "all", 1),
    ("CBD-ENS over CBD", "ImageNet-LT R50: 55.6 vs 51.6 (+4.0)", "students/cbd_ens", "students/cbd", "all", 1),
    ("DeiT-LT: DIST head over CLS on the tail", "CIFAR-10-LT: DIST best on few (DeiT-LT Table S.3)",
     "students/deit_lt:dist", "students/deit_lt:cls", "few", 1),
    ("DeiT-LT: CLS head over DIST on the head", "CIFAR-10-LT: CLS best on many (Table S.3)", "students/deit_lt:cls",
     "students/deit_lt:dist", "many", 1),
    ("DeiT-LT student over its teacher", "CIFAR-10-LT: 87.5 vs PaCo+SAM 86.8 (+0.7; Table 5)",
     "students/deit_lt:avg", "teachers/paco_sam", "all", 1),
    ("RAC: retrieval branch over base on the tail", "Places-LT / iNat: retrieval carries the few-shot classes (RAC §4)",
     "students/rac:retrieval", "students/rac:base", "few", 1),
    ("RAC: fused over the retrieval branch", "Places-LT 47.2 fused, above either branch alone (RAC ablation)",
     "students/rac:fused", "students/rac:retrieval", "all", 1),
    ("RAC: fused over the base branch", "(same)", "students/rac:fused", "students/rac:base", "all", 1),
]


def _pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def group_masks(labels: np.ndarray, manifest: dict) -> dict[str, np.ndarray]:
    groups = np.asarray(manifest["shot_groups"])
    return {"all": np.ones(len(labels), dtype=bool), **{g: np.isin(labels, np.flatnonzero(groups == g))
                                                         for g in ("many", "medium", "few")}}


def verdict(d: dict, sign: int) -> str:
    if not np.isfinite(d["diff"]):
        return "–"
    if (d["low"] > 0 and sign > 0) or (d["high"] < 0 and sign < 0):
        return "holds"
    if (d["high"] < 0 and sign > 0) or (d["low"] > 0 and sign < 0):
        return "reversed"
    return "not resolved"


def write_report(data_root: Path, result: dict, out: Path) -> str:
    metrics = json.loads((data_root / "reports" / "metrics.json").read_text())
    manifest = json.loads((data_root / "dataset" / "manifest.json").read_text())
    ensembles = metrics.get("ensembles") or _ensembles(data_root)
    outputs, labels = collect_outputs(data_root, ensembles)
    correct = {name: z.argmax(1) == labels for name, z in outputs.items()}
    masks = group_masks(labels, manifest)
    sizes = manifest["shot_group_sizes"]
    seeds = metrics.get("seeds", {})
    gap = metrics.get("gap_closed", {}).get("models", {})

    lines = [f"# Fashion-MNIST-LT (IF {manifest['imbalance_factor']:g}, {len(labels)} test images)", "",
             f"Top-1 (%) of the primary run (seed 0) with its 95 % Wilson interval over the test images of the group "
             f"(1,000 per class); gap closed (%) of the seed means against "
             f"`{metrics.get('gap_closed', {}).get('upper_bound', '–')}`; "
             f"models with three seeds also show mean ± std.", "",
             f"| model | gap closed: all | few | all | many ({sizes['many']}) | medium ({sizes['medium']}) | "
             f"few ({sizes['few']}) | seeds: all | few |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in outputs:
        cells = []
        for g in GROUPS:
            m = masks[g]
            k, n = int(correct[name][m].sum()), int(m.sum())
            lo, hi = wilson_interval(k, n)
            cells.append(f"{_pct(k / n if n else float('nan'))} [{_pct(lo)}, {_pct(hi)}]")
        s = seeds.get(name, {})
        seed_cells = (["–", "–"] if s.get("n", 1) < 2 else
                      [f"{_pct(s[g]['mean'])} ± {_pct(s[g]['std'])} (n {s['n']})" for g in ("all", "few")])
        gp = gap.get(name, {})
        lines.append(f"| {name} | {_pct(gp.get('all', float('nan')))} | {_pct(gp.get('few', float('nan')))} | "
                     + " | ".join(cells) + " | " + " | ".join(seed_cells) + " |")

    lines += ["", "## Claims", "",
              "| claim | paper | this run: A − B (points) [95 % paired interval] | A / B | verdict | seeds: A − B |",
              "|---|---|---|---|---|---|"]
    claims = []
    for claim, paper, a, b, g, sign in CLAIMS:
        if a not in correct or b not in correct:
            lines.append(f"| {claim} | {paper} | (no `{a if a not in correct else b}` in this run) | | – | |")
            continue
        m = masks[g]
        d = paired_difference(correct[a][m], correct[b][m])
        v = verdict(d, sign)
        seed_text = ""
        if seeds.get(a, {}).get("n", 1) > 1 and seeds.get(b, {}).get("n", 1) > 1:
            sa, sb = seeds[a][g], seeds[b][g]
            diff = sa["mean"] - sb["mean"]
            se = np.sqrt(sa["std"] ** 2 / seeds[a]["n"] + sb["std"] ** 2 / seeds[b]["n"])
            seed_text = f"{100 * diff:+.1f} (2 SE {200 * se:.1f})"
        claims.append({"claim": claim, "a": a, "b": b, "group": g, **d, "verdict": v})
        lines.append(f"| {claim} ({g}) | {paper} | {100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, "
                     f"{100 * d['high']:+.1f}] | {_pct(correct[a][m].mean())} / {_pct(correct[b][m].mean())} | "
                     f"{v} | {seed_text} |")

    stage_s = result.get("stage_s", {})
    if stage_s:
        seed_s = result.get("seed_stage_s") or {}
        lines += ["", f"## Wall time: {result['wall_s'] / 60:.1f} min for one seed ({len(stage_s)} stages, "
                      f"{result.get('jobs', 2)} at a time); seed replicas: {len(seed_s)} stages, "
                      f"{sum(seed_s.values()) / 60:.1f} min of stage time",
                  "", "| stage | s | stage | s |", "|---|---|---|---|"]
        items = sorted(stage_s.items())
        half = (len(items) + 1) // 2
        for left, right in zip(items[:half], items[half:] + [("", None)], strict=False):
            right_s = "" if right[1] is None else f"{right[1]:.0f}"
            lines.append(f"| {left[0]} | {left[1]:.0f} | {right[0]} | {right_s} |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".claims.json").write_text(json.dumps(claims, indent=2) + "\n")
    return text


def _ensembles(data_root: Path) -> dict[str, list[str]]:
    import yaml

    params = yaml.safe_load((data_root.parent / "params.yaml").read_text())
    return params.get("evaluate", {}).get("ensembles", {})


if __name__ == "__main__":
    data, result_json, md = (Path(a) for a in sys.argv[1:4])
    print(write_report(data, json.loads(result_json.read_text()), md))
