"""Top-1 accuracy overall and per shot group (many / medium / few), per class, and mean ± std over seeds.

Follows classifier-balancing ``utils.py: shot_acc`` (Kang et al., ICLR 2020; copied verbatim into PaCo), see
METHODS.md §1.3:

* the group of a class is decided by its **training** count: ``count > many`` → many, ``count < few`` → few, otherwise
  medium, so exactly 100 and exactly 20 training images are *medium*;
* only classes present in the targets are scored; a group reports the mean of its per-class accuracies (macro).

Departures from the official code (documented choices of this project):

* an empty group is ``NaN`` (reported as empty), where ``shot_acc`` reports 0;
* ``all`` is the mean of per-class accuracies over the classes present in the targets, as ``tau_norm.py`` reports it.
  ``run_networks.eval`` reports micro accuracy (correct / N) instead; on a balanced test set the two are equal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

SHOT_GROUPS = ("many", "medium", "few")


def _as_labels(predictions: np.ndarray | Sequence) -> np.ndarray:
    """Predicted labels (N,) from labels (N,) or logits (N, C) (argmax over the last axis)."""
    predictions = np.asarray(_to_numpy(predictions))
    if predictions.ndim == 2:
        return predictions.argmax(axis=1)
    if predictions.ndim != 1:
        raise ValueError(f"predictions must be labels (N,) or logits (N, C); got shape {predictions.shape}")
    return predictions.astype(np.int64)


def _to_numpy(x: object) -> object:
    # Accept torch tensors without importing torch here.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()  # type: ignore[union-attr]
    return x


def shot_groups(train_counts: np.ndarray | Sequence[int], many: int = 100, few: int = 20) -> np.ndarray:
    """Shot group of each class as a (C,) array of ``"many"`` / ``"medium"`` / ``"few"``.

    The rule lives in :func:`pipeline.data.longtail.shot_groups` (count > many: many; count < few: few).
    """
    from pipeline.data.longtail import shot_groups as groups_of

    return np.asarray(groups_of(np.asarray(train_counts).tolist(), many=many, few=few))


def per_class_accuracy(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class: correct / number of targets of that class.

    Args:
        predictions: predicted labels (N,) or logits (N, C).
        targets: true labels (N,).
        num_classes: number of classes C.

    Returns:
        (C,) float array; NaN for classes absent from ``targets``.
    """
    preds = _as_labels(predictions)
    targets = np.asarray(_to_numpy(targets)).astype(np.int64)
    if preds.shape != targets.shape:
        raise ValueError(f"predictions {preds.shape} and targets {targets.shape} differ in length")
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}); got range [{targets.min()}, {targets.max()}]")
    total = np.bincount(targets, minlength=num_classes).astype(np.float64)
    correct = np.bincount(targets[preds == targets], minlength=num_classes).astype(np.float64)
    acc = np.full(num_classes, np.nan)
    present = total > 0
    acc[present] = correct[present] / total[present]
    return acc


def shot_accuracy(
    predictions: np.ndarray,
    targets: np.ndarray,
    train_counts: np.ndarray | Sequence[int],
    many: int = 100,
    few: int = 20,
) -> dict[str, float]:
    """Top-1 accuracy overall and per shot group, each the mean of per-class accuracies (a fraction in [0, 1]).

    Args:
        predictions: predicted labels (N,) or logits (N, C) (argmax taken).
        targets: true labels (N,).
        train_counts: training images per class (C,); decides the groups (test counts never do).
        many: many-shot threshold (count > many).
        few: few-shot threshold (count < few).

    Returns:
        ``{"all", "many", "medium", "few"}``; a group with no class present in ``targets`` is NaN.
    """
    counts = np.asarray(train_counts)
    acc = per_class_accuracy(predictions, targets, num_classes=len(counts))
    groups = shot_groups(counts, many=many, few=few)
    present = ~np.isnan(acc)
    result = {"all": float(acc[present].mean()) if present.any() else float("nan")}
    for group in SHOT_GROUPS:
        mask = present & (groups == group)
        # NaN, not 0, for an empty group (official shot_acc reports 0).
        result[group] = float(acc[mask].mean()) if mask.any() else float("nan")
    return result


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds, ignoring NaNs; std is 0 for a single value.

    Args:
        values: one number per seed.

    Returns:
        ``(mean, std)``; ``(nan, nan)`` when no finite value is given.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std
