"""95 % intervals of test-set accuracies and of paired differences between two models on the same test images.

A balanced test set with ``n`` images per class makes the mean of per-class accuracies (the protocol's top-1) the
plain fraction of correct images, so its sampling error over test images is binomial:

* :func:`wilson_interval`: the Wilson score interval of ``k`` correct out of ``n`` (Wilson 1927), which stays
  inside [0, 1] near 0 % and 100 % where the normal approximation does not.
* :func:`paired_difference`: two models scored on the same images differ per image by ``d_i = c_A,i − c_B,i`` in
  {−1, 0, 1}; the mean of ``d`` with a normal 95 % interval ``± z·sd(d)/sqrt(n)`` (the large-sample form of
  McNemar's test: only images on which the models disagree contribute to ``sd(d)``). Pairing removes the
  difficulty the two share, so the interval of a difference is far narrower than the two accuracies' intervals.

Both describe test-set sampling only: training-seed noise comes on top (``seeds`` in the report).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95 % quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of the proportion ``correct / n``; ``(nan, nan)`` when ``n`` is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie in [0, n={n}]")
    if correct == 0 or correct == n:  # the closed form, without the rounding of centre ∓ half at the bound
        edge = (z * z / n) / (1.0 + z * z / n)
        return (0.0, edge) if correct == 0 else (1.0 - edge, 1.0)
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, z: float = Z95) -> dict[str, float]:
    """Accuracy of A minus accuracy of B on the same images, with its normal ``z`` interval.

    Args:
        correct_a: (N,) bool, image i classified correctly by A.
        correct_b: (N,) bool, the same images by B.

    Returns:
        ``{"diff", "low", "high", "se", "n"}``; ``diff`` is NaN for no images.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a {a.shape} and correct_b {b.shape} must be equal 1-D shapes")
    n = len(a)
    if n == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "se": float("nan"), "n": 0}
    d = a - b
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"diff": diff, "low": diff - z * se, "high": diff + z * se, "se": se, "n": n}
