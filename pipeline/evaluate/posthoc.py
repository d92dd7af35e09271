"""Post-hoc classifier rebalancing on fixed features: τ-normalisation sweep and NCM (no training loops here).

Decoupling paper: Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020;
official code facebookresearch/classifier-balancing (METHODS.md §5.4, §5.6, §12).

* τ-normalisation (``tau_norm.py``, Eq. 4): ``w̃_i = w_i / ||w_i||^τ`` row-wise on the joint classifier ``W`` (C, D),
  **bias dropped**, logits ``x · W̃ᵀ``; grid ``np.linspace(0, 2, 21)``. The official script prints the grid and does not
  choose τ; :func:`choose_tau` offers the paper's rule (best on val) and, without a val split, the rule of Kang et al.
  Appendix B.5 (maximise the mean per-class accuracy on the *training* set). Never the test split.
* NCM (``KNNClassifier.py`` / ``run_networks.get_knncentroids``): per-class means of raw (``un``), L2-normalised
  (``l2n``) or centred-then-normalised (``cl2n``) training features; the centroids are **not** renormalised.
  ``l2`` logit = −(‖x‖² + ‖c‖² − 2x·c) (negative squared distance); ``cos`` logit = x·c / D (a scaled dot product,
  not a true cosine, as in the official code).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipeline.evaluate.metrics import shot_accuracy

logger = logging.getLogger(__name__)

FEAT_TYPES = ("un", "l2n", "cl2n")
DIST_TYPES = ("l2", "cos")
TAU_RULES = ("val", "train_balanced")
DEFAULT_TAUS = np.linspace(0.0, 2.0, 21)


def _numpy(x: object) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x)


def _float(x: object) -> np.ndarray:
    """As a floating numpy array, keeping float32/float64 and promoting integers to float32."""
    arr = _numpy(x)
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)


def _tau_normalize(weight: np.ndarray, tau: float) -> np.ndarray:
    """``pipeline.models.heads.tau_normalize`` on a numpy (C, D) weight."""
    from pipeline.models.heads import tau_normalize

    return tau_normalize(torch.from_numpy(weight), tau).numpy()


def tau_sweep(
    weight: object,
    features_by_split: Mapping[str, object],
    labels_by_split: Mapping[str, object],
    train_counts: Sequence[int] | np.ndarray,
    taus: Sequence[float] | np.ndarray = DEFAULT_TAUS,
    many: int = 100,
    few: int = 20,
) -> list[dict]:
    """Shot accuracies of the τ-normalised classifier for each τ on each split.

    Args:
        weight: joint classifier weight (C, D); the bias is dropped (``tau_norm.py``).
        features_by_split: split name → features (N, D), e.g. ``{"train": ..., "val": ..., "test": ...}``.
        labels_by_split: split name → labels (N,); same keys as ``features_by_split``.
        train_counts: training images per class (C,), for the shot groups.
        taus: the grid (default ``np.linspace(0, 2, 21)`` as in the official script).
        many: many-shot threshold.
        few: few-shot threshold.

    Returns:
        One dict per τ: ``{"tau": τ, <split>: {"all", "many", "medium", "few"}, ...}``.
    """
    missing = set(features_by_split) ^ set(labels_by_split)
    if missing:
        raise ValueError(
            f"features_by_split and labels_by_split must have the same splits; mismatch: {sorted(missing)}"
        )
    w = _float(weight)  # (C, D)
    if w.ndim != 2 or w.shape[0] != len(train_counts):
        raise ValueError(f"weight must be (C, D) with C={len(train_counts)} classes; got shape {w.shape}")
    feats = {split: _float(f) for split, f in features_by_split.items()}
    labels = {split: _numpy(y) for split, y in labels_by_split.items()}
    sweep = []
    for tau in taus:
        w_tilde = _tau_normalize(w, float(tau))  # (C, D)
        row: dict = {"tau": round(float(tau), 10)}
        for split, x in feats.items():
            logits = x @ w_tilde.T  # (N, C)
            row[split] = shot_accuracy(logits, labels[split], train_counts, many=many, few=few)
        sweep.append(row)
        logger.debug("tau=%.2f %s", tau, {s: round(row[s]["all"], 4) for s in feats})
    return sweep


def choose_tau(sweep: Sequence[Mapping], rule: str = "val") -> float:
    """Pick τ from a :func:`tau_sweep` result; ties go to the smallest τ.

    Args:
        sweep: output of :func:`tau_sweep`.
        rule: ``"val"``: best ``all`` on the ``val`` split (the paper); ``"train_balanced"``: best mean of per-class
            accuracies on the ``train`` split (Kang et al. Appendix B.5, for data sets without a val split).

    Returns:
        The chosen τ.
    """
    if rule not in TAU_RULES:
        raise ValueError(f"unknown tau rule {rule!r}; valid rules: {', '.join(TAU_RULES)}")
    split = "val" if rule == "val" else "train"
    if not sweep:
        raise ValueError("empty tau sweep")
    if split not in sweep[0]:
        raise ValueError(f"tau rule {rule!r} needs the {split!r} split in the sweep; it has {sorted(sweep[0])}")
    # 'all' on the train split is the mean of per-class accuracies, i.e. accuracy on a simulated balanced set.
    ordered = sorted(sweep, key=lambda row: row["tau"])
    scores = np.array([row[split]["all"] for row in ordered], dtype=np.float64)
    if np.all(np.isnan(scores)):
        raise ValueError(f"every {split} accuracy in the sweep is NaN")
    best = int(np.nanargmax(scores))  # first maximum = smallest τ among ties
    return float(ordered[best]["tau"])


def _transform(features: np.ndarray, featmean: np.ndarray, feat_type: str) -> np.ndarray:
    if feat_type not in FEAT_TYPES:
        raise ValueError(f"unknown feat_type {feat_type!r}; valid types: {', '.join(FEAT_TYPES)}")
    if feat_type == "cl2n":
        features = features - featmean
    if feat_type in ("l2n", "cl2n"):
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    return features


def ncm_centroids(
    train_features: object, train_labels: object, num_classes: int, feat_type: str = "cl2n"
) -> tuple[np.ndarray, np.ndarray]:
    """Class centroids of (transformed) training features, as ``run_networks.get_knncentroids``.

    Args:
        train_features: training features (N, D), train images with test transforms (``train_plain``).
        train_labels: training labels (N,).
        num_classes: number of classes C; every class needs at least one training sample.
        feat_type: ``"un"`` raw, ``"l2n"`` L2-normalised, ``"cl2n"`` centred by the mean feature then L2-normalised.

    Returns:
        ``(centroids (C, D), featmean (D,))``; the centroids are not renormalised.
    """
    x = _float(train_features)  # (N, D)
    y = _numpy(train_labels).astype(np.int64)  # (N,)
    featmean = x.mean(axis=0)  # (D,) mean of the raw features
    z = _transform(x, featmean, feat_type)
    counts = np.bincount(y, minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"train_labels contain class {y.max()} but num_classes={num_classes}")
    if (counts == 0).any():
        raise ValueError(
            f"classes without training samples have no NCM centroid: {np.flatnonzero(counts == 0).tolist()}"
        )
    sums = np.zeros((num_classes, x.shape[1]), dtype=np.float64)
    np.add.at(sums, y, z)
    centroids = (sums / counts[:, None]).astype(x.dtype)  # (C, D)
    return centroids, featmean


def ncm_logits(
    features: object, centroids: np.ndarray, featmean: np.ndarray, feat_type: str = "cl2n", dist_type: str = "l2"
) -> np.ndarray:
    """NCM logits of query features against class centroids (``KNNClassifier.forward``).

    Args:
        features: query features (N, D).
        centroids: (C, D) from :func:`ncm_centroids` with the same ``feat_type``.
        featmean: (D,) from :func:`ncm_centroids`.
        feat_type: ``"un"`` / ``"l2n"`` / ``"cl2n"``, the same transform as the centroids.
        dist_type: ``"l2"``: −(‖x‖² + ‖c‖² − 2x·c); ``"cos"``: x·c / D.

    Returns:
        (N, C) logits (higher is closer).
    """
    if dist_type not in DIST_TYPES:
        raise ValueError(f"unknown dist_type {dist_type!r}; valid types: {', '.join(DIST_TYPES)}")
    x = _transform(_float(features), _float(featmean), feat_type)  # (N, D)
    c = _float(centroids)  # (C, D)
    dots = x @ c.T  # (N, C)
    if dist_type == "cos":
        return dots / x.shape[1]
    return -((x * x).sum(1, keepdims=True) + (c * c).sum(1)[None, :] - 2.0 * dots)
