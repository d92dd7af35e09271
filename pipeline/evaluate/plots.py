"""Comparison plots (PNG, matplotlib Agg backend): per-class accuracy vs training count, shot-group bars, τ sweep.

The per-class curve is the standard long-tail diagnostic (classes sorted by training count, head first, as in
Kang et al. 2020 Fig. 2 and the RAC paper's Fig. 2). NaN values (a class absent from the test set, an empty shot group)
are left out of the plot instead of failing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or GPU workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

GROUPS = ("all", "many", "medium", "few")


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Write the figure atomically (temporary name, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("wrote %s", path)
    return path


def plot_per_class_accuracy(
    curves: Mapping[str, np.ndarray], train_counts: Sequence[int] | np.ndarray, path: str | os.PathLike
) -> Path:
    """Accuracy of each class against its rank by training count (head left), one line per model.

    Args:
        curves: model name → per-class accuracy (C,) in [0, 1]; NaN entries are skipped.
        train_counts: training images per class (C,).
        path: output PNG.

    Returns:
        The written path.
    """
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")  # head first
    rank = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, acc in curves.items():
        acc = np.asarray(acc, dtype=np.float64)
        if acc.shape != counts.shape:
            raise ValueError(f"curve {name!r} has shape {acc.shape}; expected {counts.shape} (one value per class)")
        sorted_acc = acc[order]
        ok = ~np.isnan(sorted_acc)
        ax.plot(rank[ok], 100 * sorted_acc[ok], marker=".", linewidth=1, label=name)
    ax.set_xlabel("class rank by training count (head → tail)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(-2, 102)
    # Training counts on a second axis: the long tail itself.
    ax2 = ax.twinx()
    ax2.bar(rank, counts[order], color="grey", alpha=0.2, width=1.0)
    ax2.set_yscale("log" if counts.max() > 0 and counts[counts > 0].min() > 0 else "linear")
    ax2.set_ylabel("training images")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    if curves:
        ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_split_bars(table: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Grouped bars of all / many / medium / few accuracy per model (NaN → no bar).

    Args:
        table: model name → ``{"all", "many", "medium", "few"}`` fractions in [0, 1].
        path: output PNG.

    Returns:
        The written path.
    """
    models = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(GROUPS) * max(1, len(models)) / 2), 4.5))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(GROUPS))
    for i, model in enumerate(models):
        values = np.array([table[model].get(g, np.nan) for g in GROUPS], dtype=np.float64)
        ok = ~np.isnan(values)
        ax.bar(x[ok] + (i - (len(models) - 1) / 2) * width, 100 * values[ok], width=width, label=model)
    ax.set_xticks(x, GROUPS)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    if models:
        ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1.0), loc="upper left")
    return _save(fig, path)


def plot_seed_errorbars(seeds: Mapping[str, Mapping], path: str | os.PathLike, baseline: str | None = None,
                        marks: Mapping[str, Mapping[str, Mapping]] | None = None) -> Path:
    """Mean accuracy ± std over seeds per model, one panel per shot group, with each seed's value as a dot.

    Args:
        seeds: model → ``{"n", <group>: {"mean", "std", "values"}}`` (``pipeline.evaluate.report.seed_statistics``).
        path: output PNG.
        baseline: a model drawn as a dashed line with its ±2 SE band in every panel (the CE teacher).
        marks: model → group → ``{"significant"}``: significant differences to the baseline are drawn in red.

    Returns:
        The written path.
    """
    models = list(seeds)
    y = np.arange(len(models))[::-1]
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(3.2 * len(GROUPS), 0.32 * len(models) + 1.5), sharey=True)
    for ax, g in zip(np.atleast_1d(axes), GROUPS, strict=True):
        for yi, m in zip(y, models, strict=True):
            stats = seeds[m][g]
            if not np.isfinite(stats["mean"]):
                continue
            significant = bool(((marks or {}).get(m, {}).get(g) or {}).get("significant"))
            colour = "tab:red" if significant else "tab:blue"
            std = stats["std"] if np.isfinite(stats["std"]) else 0.0
            ax.errorbar(100 * stats["mean"], yi, xerr=100 * std, fmt="o", color=colour, capsize=3, markersize=4)
            values = np.asarray(stats["values"], dtype=np.float64)
            ax.scatter(100 * values, np.full(values.shape, yi), s=6, color="grey", alpha=0.6, zorder=3)
        if baseline in seeds and np.isfinite(seeds[baseline][g]["mean"]):
            b, n_base = seeds[baseline][g], seeds[baseline]["n"]
            ax.axvline(100 * b["mean"], color="black", linestyle="--", linewidth=0.8)
            if n_base > 1 and np.isfinite(b["std"]):
                half = 100 * 2 * b["std"] / np.sqrt(n_base)
                ax.axvspan(100 * b["mean"] - half, 100 * b["mean"] + half, color="grey", alpha=0.15)
        ax.set_title(g)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(y, models, fontsize="small")
    n = max((seeds[m]["n"] for m in models), default=1)
    fig.suptitle(f"mean ± std over {n} seed(s); dashed: {baseline} (band ±2 SE); red: beyond 2 SE of it",
                 fontsize="medium")
    return _save(fig, path)


def plot_tau_sweep(sweep: Sequence[Mapping], path: str | os.PathLike, split: str = "val") -> Path:
    """Accuracy per shot group against τ for one split of a ``tau_sweep`` result.

    Args:
        sweep: output of ``pipeline.evaluate.posthoc.tau_sweep``.
        path: output PNG.
        split: which split to draw.

    Returns:
        The written path.
    """
    if sweep and split not in sweep[0]:
        raise ValueError(f"split {split!r} is not in the sweep; available: {sorted(k for k in sweep[0] if k != 'tau')}")
    taus = np.array([row["tau"] for row in sweep], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in GROUPS:
        values = np.array([row[split].get(group, np.nan) for row in sweep], dtype=np.float64)
        ok = ~np.isnan(values)
        if ok.any():
            ax.plot(taus[ok], 100 * values[ok], marker="o", markersize=3, label=group)
    ax.set_xlabel("τ")
    ax.set_ylabel(f"top-1 accuracy on {split} (%)")
    ax.legend(fontsize="small")
    return _save(fig, path)
