"""The comparison across every model of the pipeline: one table, per-class and per-split plots.

Models are found by their ``predictions.npz`` under ``data/{teachers,students,rebalance,index,memory}/<name>/``;
each head (``test/<head>`` logits) is one row. Teacher ensembles (CBD paper, Table 2) average the teachers' softmax
outputs.
Names that differ only by a ``_s<seed>`` / ``-seed<seed>`` suffix form one group, reported as mean ± std over seeds.

With a balanced upper bound ``upper_bound/<recipe>`` (``pipeline.upper_bound``) every model also gets the share of
the gap it closes, per shot group: ``(model − teachers/<recipe>) / (upper_bound/<recipe> − teachers/<recipe>)``; a
group whose gap is under one point (e.g. the head classes, where CE is already at its best) has none (NaN).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.evaluate.metrics import mean_std, per_class_accuracy, shot_accuracy
from pipeline.evaluate.predict import load_predictions

KINDS = ("teachers", "students", "rebalance", "index", "memory", "upper_bound")
GROUPS = ("all", "many", "medium", "few")
_SEED = re.compile(r"(?:[_-](?:s|seed)\d+)$")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def collect_outputs(data_root: Path, ensembles: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{'<kind>/<name>[:<head>]': test logits or scores (N, C)}`` and the test labels."""
    outputs: dict[str, np.ndarray] = {}
    labels = None
    for kind in KINDS:
        for d in sorted(p for p in (data_root / kind).glob("*") if (p / "predictions.npz").is_file()):
            preds = load_predictions(d)
            labels = preds["test_labels"] if labels is None else labels
            if not np.array_equal(labels, preds["test_labels"]):
                raise ValueError(f"{d}: its test labels differ from the other models' (rerun it on this dataset)")
            heads = [k.split("/", 1)[1] for k in preds if k.startswith("test/")]
            for head in heads:
                key = f"{kind}/{d.name}" if head == "main" or len(heads) == 1 else f"{kind}/{d.name}:{head}"
                outputs[key] = preds[f"test/{head}"]
    for name, members in ensembles.items():
        keys = [f"teachers/{m}" for m in members]
        missing = [k for k in keys if k not in outputs]
        if missing:
            raise ValueError(f"evaluate.ensembles.{name}: no predictions for {', '.join(missing)}")
        outputs[f"ensemble/{name}"] = np.mean([_softmax(outputs[k]) for k in keys], axis=0)
    if labels is None:
        raise FileNotFoundError(f"no predictions.npz under {data_root}/{{{','.join(KINDS)}}}: run the pipeline first")
    return outputs, labels


MIN_GAP = 0.01  # a gap under one point has no meaningful share


def gap_closed(models: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per model and shot group, the share of the (balanced − long-tailed CE) gap it closes (see the docstring)."""
    bounds = [k for k in models if k.startswith("upper_bound/") and ":" not in k]
    if not bounds:
        return {}
    upper = bounds[0]
    base = f"teachers/{upper.split('/', 1)[1]}"
    if base not in models:
        return {}
    out = {}
    for name, acc in models.items():
        out[name] = {}
        for g in GROUPS:
            gap = models[upper][g] - models[base][g]
            out[name][g] = (acc[g] - models[base][g]) / gap if np.isfinite(gap) and gap >= MIN_GAP else float("nan")
    return {"baseline": base, "upper_bound": upper, "models": out}


def build_report(outputs: dict[str, np.ndarray], labels: np.ndarray, manifest: dict) -> dict:
    counts = manifest["train_counts"]
    many, few = manifest["thresholds"]["many"], manifest["thresholds"]["few"]
    models = {k: shot_accuracy(v.argmax(1), labels, counts, many=many, few=few) for k, v in outputs.items()}
    per_class = {k: per_class_accuracy(v.argmax(1), labels, len(counts)) for k, v in outputs.items()}
    groups: dict[str, list[str]] = {}
    for k in models:
        groups.setdefault(_SEED.sub("", k), []).append(k)
    seeds = {}
    for g, members in groups.items():
        if len(members) > 1:
            seeds[g] = {m: dict(zip(("mean", "std"), mean_std([models[k][m] for k in members]), strict=True))
                        for m in GROUPS} | {"runs": members}
    return {"dataset": {k: manifest[k] for k in ("source", "num_classes", "shot_group_sizes", "thresholds")},
            "models": models, "seeds": seeds, "gap_closed": gap_closed(models),
            "per_class": {k: v.tolist() for k, v in per_class.items()}}


def _pct(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def summary_markdown(report: dict) -> str:
    sizes = report["dataset"]["shot_group_sizes"]
    gap = report.get("gap_closed") or {}
    head = f"| model | all | many ({sizes['many']}) | medium ({sizes['medium']}) | few ({sizes['few']}) |"
    rule = "|---|---|---|---|---|"
    if gap:
        head += " gap closed: all | many | medium | few |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for name, acc in report["models"].items():
        row = f"| {name} | " + " | ".join(_pct(acc[g]) for g in GROUPS) + " |"
        if gap:
            row += " " + " | ".join(_pct(gap["models"][name][g]) for g in GROUPS) + " |"
        lines.append(row)
    if report["seeds"]:
        lines += ["", "| model (mean ± std over seeds) | all | many | medium | few |", "|---|---|---|---|---|"]
        for name, s in report["seeds"].items():
            lines.append(f"| {name} ({len(s['runs'])} seeds) | " + " | ".join(
                f"{_pct(s[g]['mean'])} ± {_pct(s[g]['std'])}" for g in GROUPS) + " |")
    t = report["dataset"]["thresholds"]
    lines += ["", f"Top-1 accuracy (%) on the balanced test set; many > {t['many']}, few < {t['few']} training images, "
              "medium in between; each group is the mean of its classes' accuracies (– = empty group)."]
    if gap:
        lines += [f"Gap closed (%) = (model − {gap['baseline']}) / ({gap['upper_bound']} − {gap['baseline']}) per "
                  f"group: 0 = the long-tailed CE, 100 = the same recipe on a balanced training set; – where that "
                  f"gap is under {100 * MIN_GAP:.0f} point."]
    return "\n".join(lines) + "\n"


def multi_head_models(report: dict) -> dict[str, list[str]]:
    """``{'<kind>/<name>': [its row keys '<kind>/<name>:<head>', ...]}`` for every model with several heads
    (DeiT-LT: avg, cls, dist; RAC: fused, base, retrieval; kNN: knn, nn)."""
    heads: dict[str, list[str]] = {}
    for key in report["models"]:
        if ":" in key:
            heads.setdefault(key.split(":", 1)[0], []).append(key)
    return {model: keys for model, keys in heads.items() if len(keys) > 1}


def per_class_rows(report: dict, counts: list[int]) -> list[dict]:
    """Rows for DVC's per-class plot: one per class, ordered head first, a column per model."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    return [{"class_rank": r, "class": int(c), "train_count": int(counts[c]),
             **{k: (None if np.isnan(v[c]) else round(v[c], 4)) for k, v in report["per_class"].items()}}
            for r, c in enumerate(order)]
