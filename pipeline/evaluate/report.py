"""The comparison across every model of the pipeline: one table, per-class and per-split plots.

Models are found by their ``predictions.npz`` under ``data/{teachers,students,rebalance,index,memory}/<name>/``;
each head (``test/<head>`` logits) is one row. Teacher ensembles (CBD paper, Table 2) average the teachers' softmax
outputs.
Seed replicas (``seeds.replicas``: the same models trained with their seed + K, under ``data/seeds/<K>/``) make each
row a mean ± std (sample std, ddof=1) over the primary run and the replicas. A model's difference to the CE teacher
is marked where it exceeds two standard errors, ``|m − m_CE| > 2 sqrt(s²/n + s_CE²/n_CE)`` (seeds of two models are
independent draws, so the unpaired standard error); with one seed nothing is marked.

With a balanced upper bound ``upper_bound/<recipe>`` (``pipeline.upper_bound``) every model also gets the share of
the gap it closes, per shot group: ``(model − teachers/<recipe>) / (upper_bound/<recipe> − teachers/<recipe>)``; a
group whose gap is under one point (e.g. the head classes, where CE is already at its best) has none (NaN).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluate.metrics import mean_std, per_class_accuracy, shot_accuracy
from pipeline.evaluate.predict import load_predictions

KINDS = ("teachers", "students", "rebalance", "index", "memory", "upper_bound")
GROUPS = ("all", "many", "medium", "few")
SE_MARGIN = 2.0  # a difference to the baseline beyond this many standard errors is marked


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def collect_outputs(data_root: Path, ensembles: dict[str, list[str]], strict: bool = True
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{'<kind>/<name>[:<head>]': test logits or scores (N, C)}`` and the test labels.

    An ensemble with a member missing is an error when ``strict`` (the primary run), else left out (a seed replica
    whose stages ran only in part: the ensemble's row then has fewer seeds).
    """
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
        if missing and not strict:
            continue
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


def collect_seed_outputs(data_root: Path, ensembles: dict[str, list[str]], replicas: list[int]
                         ) -> tuple[dict[int, dict[str, np.ndarray]], np.ndarray]:
    """:func:`collect_outputs` of the primary run (seed 0, ``data_root``) and of each replica K
    (``data_root/seeds/K``): ``{K: outputs}`` and the test labels, which must be the same everywhere."""
    outputs, labels = collect_outputs(data_root, ensembles)
    runs = {0: outputs}
    for k in replicas:
        root = data_root / "seeds" / str(k)
        if not root.is_dir():
            raise FileNotFoundError(f"seeds.replicas lists {k} but {root} does not exist: run its *_seed stages")
        runs[k], replica_labels = collect_outputs(root, ensembles, strict=False)
        if not np.array_equal(labels, replica_labels):
            raise ValueError(f"{root}: its test labels differ from the primary run's (rerun it on this dataset)")
    return runs, labels


def seed_statistics(runs: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict]:
    """Per model (a row of the primary run): mean, std and n over the seeds that have it, per shot group."""
    out = {}
    for name in runs[0]:
        seeds = [k for k in sorted(runs) if name in runs[k]]
        stats: dict = {"n": len(seeds), "seeds": seeds}
        for g in GROUPS:
            values = [runs[k][name][g] for k in seeds]
            mean, std = mean_std(values)
            stats[g] = {"mean": mean, "std": std if len(values) > 1 else float("nan"), "values": values}
        out[name] = stats
    return out


def compare_to_baseline(seeds: dict[str, dict], baseline: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and group: the difference of means to ``baseline``, its standard error and whether it exceeds
    :data:`SE_MARGIN` standard errors (None where a side has a single seed: no error estimate)."""
    if baseline not in seeds:
        return {}
    base = seeds[baseline]
    out = {}
    for name, s in seeds.items():
        out[name] = {}
        for g in GROUPS:
            diff = s[g]["mean"] - base[g]["mean"]
            if s["n"] > 1 and base["n"] > 1:
                se = float(np.sqrt(s[g]["std"] ** 2 / s["n"] + base[g]["std"] ** 2 / base["n"]))
                significant = bool(np.isfinite(diff) and abs(diff) > SE_MARGIN * se) if name != baseline else False
            else:
                se, significant = float("nan"), None
            out[name][g] = {"diff": diff, "se": se, "significant": significant}
    return out


def build_report(outputs: dict[str, np.ndarray] | dict[int, dict[str, np.ndarray]], labels: np.ndarray,
                 manifest: dict) -> dict:
    """The comparison: ``models`` (the primary run's accuracy per row and group), ``seeds`` (mean ± std over the
    seeds), ``gap_closed`` (of the seed means) and ``vs_baseline`` (differences to the CE teacher).

    ``outputs`` is one run's ``{row: logits}`` or ``{seed: {row: logits}}`` (:func:`collect_seed_outputs`).
    """
    runs_out = outputs if all(isinstance(k, int) for k in outputs) else {0: outputs}
    counts = manifest["train_counts"]
    many, few = manifest["thresholds"]["many"], manifest["thresholds"]["few"]
    runs = {k: {name: shot_accuracy(v.argmax(1), labels, counts, many=many, few=few) for name, v in out.items()}
            for k, out in runs_out.items()}
    models = runs[0]
    per_class = {k: per_class_accuracy(v.argmax(1), labels, len(counts)) for k, v in runs_out[0].items()}
    seeds = seed_statistics(runs)
    gap = gap_closed({name: {g: s[g]["mean"] for g in GROUPS} for name, s in seeds.items()})
    return {"dataset": {k: manifest[k] for k in ("source", "num_classes", "shot_group_sizes", "thresholds")},
            "models": models, "seeds": seeds, "gap_closed": gap,
            "vs_baseline": compare_to_baseline(seeds, gap["baseline"]) if gap else {},
            "per_class": {k: v.tolist() for k, v in per_class.items()}}


def _pct(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def _cell(stats: dict, mark: bool | None = None, diff: float = 0.0) -> str:
    text = _pct(stats["mean"])
    if np.isfinite(stats["std"]):
        text += f" ± {_pct(stats['std'])}"
    if mark:
        text += " ▲" if diff > 0 else " ▼"
    return text


def summary_markdown(report: dict) -> str:
    sizes = report["dataset"]["shot_group_sizes"]
    gap = report.get("gap_closed") or {}
    vs = report.get("vs_baseline") or {}
    n_seeds = max((s["n"] for s in report["seeds"].values()), default=1)
    head = (f"| model | seeds | all | many ({sizes['many']}) | medium ({sizes['medium']}) | few ({sizes['few']}) |")
    rule = "|---|---|---|---|---|---|"
    if gap:
        head += " gap closed: all | many | medium | few |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for name, s in report["seeds"].items():
        marks = vs.get(name, {})
        row = f"| {name} | {s['n']} | " + " | ".join(
            _cell(s[g], marks.get(g, {}).get("significant"), marks.get(g, {}).get("diff", 0.0)) for g in GROUPS) + " |"
        if gap:
            row += " " + " | ".join(_pct(gap["models"][name][g]) for g in GROUPS) + " |"
        lines.append(row)
    t = report["dataset"]["thresholds"]
    stat = ("mean ± std (sample std) over seeds" if n_seeds > 1
            else "one seed (seeds.replicas adds more: -S seeds=three)")
    lines += ["", f"Top-1 accuracy (%) on the balanced test set, {stat}; many > {t['many']}, few < {t['few']} "
              "training images, medium in between; each group is the mean of its classes' accuracies "
              "(– = empty group)."]
    if vs and n_seeds > 1:
        lines += [f"▲ / ▼: above / below {gap['baseline']} by more than {SE_MARGIN:.0f} standard errors of the "
                  "difference of means (unpaired); unmarked differences are within seed noise."]
    if gap:
        lines += [f"Gap closed (%) of the means = (model − {gap['baseline']}) / ({gap['upper_bound']} − "
                  f"{gap['baseline']}) per group: 0 = the long-tailed CE, 100 = the same recipe on a balanced "
                  f"training set; – where that gap is under {100 * MIN_GAP:.0f} point."]
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
