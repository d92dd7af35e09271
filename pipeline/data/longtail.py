"""Long-tailed class profiles, the official subsampling, shot groups and balanced splits.

References:
    * Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019,
      official code kaidic/LDAM-DRW ``imbalance_cifar.py`` (copied into PaCo, DeiT-LT and Saddle-LongTail):
      ``n_i = int(img_max * imb_factor ** (i / (C - 1.0)))`` with ``imb_factor = 1 / IF`` (METHODS.md §1.1).
    * Liu et al., "Large-Scale Long-Tailed Recognition in an Open World" (OLTR), CVPR 2019: ImageNet-LT / Places-LT
      were drawn from a Pareto (Zipf-like) distribution; ``profile="pareto"`` gives that shape (§1.2).
    * Kang et al., "Decoupling Representation and Classifier", ICLR 2020, ``utils.py: shot_acc``: many (> 100),
      medium (20 <= n <= 100), few (< 20) by *training* counts (§1.3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

PROFILES = ("exp", "step", "pareto", "none")


def longtail_counts(n_max: float, num_classes: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed training set, head (class 0) first.

    Profiles:
        * ``exp`` (official LDAM-DRW): ``int(n_max * (1/IF) ** (i / (C - 1.0)))``. ``int`` truncates and the
          arithmetic is the official one, so CIFAR-10 (n_max 5000, IF 100) gives exactly 12,406 images.
        * ``step``: the first ``C // 2`` classes get ``int(n_max)``, the rest ``int(n_max * (1/IF))`` (official).
        * ``pareto``: power law (OLTR-style Zipf profile) ``n_i = int(n_max * (i + 1) ** -a)`` with
          ``a = log(IF) / log(C)``, so the head has ``n_max`` and the tail ``n_max / IF``. A relative 1e-9 is added
          before truncation so that a count meant to be an integer (e.g. the tail 5.0) is not lost to rounding
          (4.999999 -> 4); this profile has no official code to match bit for bit.
        * ``none``: a balanced set, every class ``int(n_max)`` (the official "any other type").

    Args:
        n_max: images of the head class (the official ``img_max``; may be a float such as 5000.0).
        num_classes: number of classes C.
        imbalance_factor: IF = n_max / n_min >= 1 (the official code takes ``imb_factor = 1 / IF``).
        profile: one of ``exp``, ``step``, ``pareto``, ``none``.

    Returns:
        C integer counts, non-increasing for ``exp``/``step``/``pareto``.

    Raises:
        ValueError: for IF < 1, C < 1, n_max < 1, an unknown profile, or a class that would get 0 images.
    """
    if not imbalance_factor >= 1:  # written so that NaN fails too
        raise ValueError(f"imbalance_factor must be >= 1 (n_max / n_min), got {imbalance_factor}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not (n_max >= 1 and math.isfinite(n_max)):
        raise ValueError(f"n_max must be a finite number >= 1, got {n_max}")
    C = int(num_classes)
    imb = 1.0 / imbalance_factor  # the official `imb_factor` argument (0.01 for IF 100)
    if profile == "exp":
        # C == 1 would divide by zero in the official formula; a single class simply gets n_max.
        counts = [int(n_max)] if C == 1 else [int(n_max * imb ** (i / (C - 1.0))) for i in range(C)]
    elif profile == "step":
        counts = [int(n_max)] * (C // 2) + [int(n_max * imb)] * (C - C // 2)
    elif profile == "pareto":
        a = math.log(imbalance_factor) / math.log(C) if C > 1 else 0.0
        counts = [int(n_max * (i + 1) ** -a * (1 + 1e-9)) for i in range(C)]
    elif profile == "none":
        counts = [int(n_max)] * C
    else:
        raise ValueError(f"unknown long-tail profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    for c, n in enumerate(counts):
        if n < 1:
            raise ValueError(
                f"class {c} would get {n} images (profile={profile!r}, n_max={n_max}, "
                f"imbalance_factor={imbalance_factor}); lower imbalance_factor or raise n_max"
            )
    return counts


def subsample_indices(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices of the long-tailed subset, exactly as LDAM-DRW ``gen_imbalanced_data`` selects them.

    For each class ``c`` ascending: ``idx = np.where(labels == c)[0]``, shuffle ``idx``, keep ``idx[:counts[c]]``;
    the class blocks are concatenated (class-sorted, shuffled inside each block). The official code calls
    ``np.random.seed(seed)`` once and then ``np.random.shuffle``; ``np.random.RandomState(seed).shuffle`` draws the
    identical sequence (the global RNG *is* a ``RandomState``) without re-seeding the global RNG, which avoids the
    side effect flagged in METHODS.md §1.1.

    Args:
        labels: (N,) integer labels of the full pool, classes ``0..len(counts)-1``.
        counts: wanted images per class, indexed by class id.
        seed: the official ``rand_number`` (0 in every official recipe).

    Returns:
        (sum(counts),) int64 indices into ``labels``.

    Raises:
        ValueError: if a class has fewer images than asked for.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    blocks = []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n_c:
            raise ValueError(
                f"class {c} has {len(idx)} images but the profile asks for {n_c}; lower n_max (or the pool's "
                f"val/test carve-out) so that every class has enough images"
            )
        rng.shuffle(idx)
        blocks.append(idx[:n_c])
    return np.concatenate(blocks).astype(np.int64) if blocks else np.zeros(0, dtype=np.int64)


def shot_groups(train_counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """Many / medium / few group of each class from its *training* count (classifier-balancing ``shot_acc``).

    ``n > many`` -> 'many'; ``n < few`` -> 'few'; otherwise 'medium' (so exactly 100 and exactly 20 are medium).
    """
    if few > many:
        raise ValueError(f"shot thresholds need few <= many, got few={few}, many={many}")
    return ["many" if n > many else "few" if n < few else "medium" for n in train_counts]


def balanced_split(
    labels: np.ndarray, per_class: int, seed: int | Sequence[int], num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Take ``per_class`` random samples of every class (a balanced val/test split) and return the rest.

    Args:
        labels: (N,) integer labels.
        per_class: samples taken from each class (0 takes nothing).
        seed: seed (or seed sequence) of a private ``np.random.default_rng``; the global RNG is untouched.
        num_classes: classes ``0..num_classes-1`` to take from (default: ``max(labels) + 1``).

    Returns:
        ``(taken_idx, rest_idx)``: taken in class blocks (shuffled inside each block), rest sorted ascending; both
        int64 indices into ``labels``.

    Raises:
        ValueError: if ``per_class < 0`` or a class has fewer than ``per_class`` samples.
    """
    labels = np.asarray(labels)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    C = int(labels.max()) + 1 if num_classes is None and len(labels) else int(num_classes or 0)
    rng = np.random.default_rng(seed)
    taken = []
    for c in range(C):
        idx = np.where(labels == c)[0]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than the {per_class} per class asked for")
        taken.append(rng.permutation(idx)[:per_class])
    taken_idx = np.concatenate(taken).astype(np.int64) if taken else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[taken_idx] = False
    return taken_idx, np.flatnonzero(mask).astype(np.int64)
