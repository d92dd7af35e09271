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
