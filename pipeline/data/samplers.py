"""Training samplers for long-tailed data: instance, class-balanced, square-root, progressive, class-aware, CBD.

References:
    * Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020, §3 Eq. 1-2:
      ``p_j = n_j^q / sum_i n_i^q`` (instance q=1, class-balanced q=0, square-root q=1/2) and progressively
      balanced ``p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB`` (METHODS.md §12); official ``ClassAwareSampler``
      of facebookresearch/classifier-balancing (§5.2).
    * Iscen et al., "Class-Balanced Distillation for Long-Tailed Visual Recognition", BMVC 2021, official
      ``input_pipeline.py`` over/under-sampling (§7.3).
    * Repeated augmentation (Hoffer et al. 2020; DeiT / DeiT-LT ``samplers.RASampler``, §6.3).

Every sampler's order is a pure function of ``(seed, epoch)``: :meth:`set_epoch` selects the epoch, and iterating
twice over the same epoch gives the same indices. Each epoch draws from ``np.random.default_rng([seed, epoch])``.

What a training DataLoader iterates (:meth:`EpochSampler.configure`, set by ``pipeline.build``):

* sharding: with ``world_size`` W > 1, rank r takes positions ``r, r + W, r + 2W, ...`` of the epoch's global order,
  padded (as ``torch.utils.data.DistributedSampler``) by repeating its first entries to a multiple of W, so every
  rank has the same number of samples and the ranks' j-th batches of B together are the single-process j-th batch
  of W·B;
* a start position (:meth:`skip`): a run resumed inside an epoch iterates only the samples not yet trained on,
  without loading the skipped ones; ``set_epoch`` resets it to 0;
* per-sample augmentation seeds (``sample_seeds=True``): each entry is ``(index, seed)`` with ``seed`` drawn for the
  entry's position in the global epoch order from ``default_rng([seed, epoch, 1])``;
  ``pipeline.data.datasets.ImageDataset`` seeds the augmentation of that sample with it. Augmentations are then a
  pure function of (seed, epoch, position): the same with 0 or 2 DataLoader workers, on any number of ranks, and
  after a resume inside an epoch.

With the defaults (one rank, start 0, no seeds) iteration yields the epoch's indices as ints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from pipeline.registry import Registry

logger = logging.getLogger(__name__)

SAMPLERS: Registry[Sampler] = Registry("sampler")


class EpochSampler(Sampler[int]):
    """Base class: labels, seed and epoch; subclasses implement :meth:`indices` for the current epoch.

    Args:
        labels: (N,) integer labels of the training split.
        seed: base seed; epoch ``e`` uses ``np.random.default_rng([seed, e])``.
        num_epochs: total epochs of the run (used by schedules such as ``progressive``).
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, seed: int = 0, num_epochs: int = 1) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.ndim != 1 or len(self.labels) == 0:
            raise ValueError(f"sampler needs a non-empty 1-D label array, got shape {self.labels.shape}")
        if self.labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {self.labels.min()}")
        self.seed = int(seed)
        self.num_epochs = int(num_epochs)
        self.epoch = 0
        self.counts = np.bincount(self.labels)  # (C,) samples per class; a class may have 0
        self._cache: tuple[int, np.ndarray] | None = None
        self.rank, self.world_size, self.sample_seeds, self.start = 0, 1, False, 0

    def configure(self, *, rank: int = 0, world_size: int = 1, sample_seeds: bool = False) -> EpochSampler:
        """Set what iteration yields: rank ``rank``'s shard of ``world_size`` and, optionally, per-sample seeds."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"sampler rank {rank} of world_size {world_size}; valid: 0 <= rank < world_size")
        self.rank, self.world_size, self.sample_seeds = int(rank), int(world_size), bool(sample_seeds)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (from its first sample)."""
        self.epoch = int(epoch)
        self.start = 0

    def skip(self, n: int) -> None:
        """Start the current epoch's iteration after the first ``n`` samples of this rank's shard."""
        if not 0 <= n <= self.shard_length():
            raise ValueError(f"sampler skip {n}: valid 0..{self.shard_length()} (this rank's samples this epoch)")
        self.start = int(n)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def indices(self) -> np.ndarray:
        """(L,) int64 dataset indices of the current epoch; a pure function of (seed, epoch)."""
        raise NotImplementedError

    def _epoch_indices(self) -> np.ndarray:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.indices())
        return self._cache[1]

    def shard_length(self) -> int:
        """Samples of this rank's shard in the current epoch: ``ceil(L / world_size)``."""
        return -(-len(self._epoch_indices()) // self.world_size)

    def shard(self) -> tuple[np.ndarray, np.ndarray | None]:
        """This rank's (indices, per-sample seeds or None) of the current epoch, from the start position."""
        idx = self._epoch_indices()
        total = self.shard_length() * self.world_size
        positions = np.arange(total) % max(len(idx), 1)  # DistributedSampler padding: wrap to the first entries
        mine = positions[self.rank::self.world_size][self.start:]  # (shard_length - start,) global positions
        seeds = None
        if self.sample_seeds:
            all_seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**62, size=total)
            seeds = all_seeds[np.arange(total)[self.rank::self.world_size][self.start:]]
        return idx[mine], seeds

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        idx, seeds = self.shard()
        if seeds is None:
            return iter(idx.tolist())
        return zip(idx.tolist(), seeds.tolist(), strict=True)

    def __len__(self) -> int:
        return self.shard_length() - self.start

    def state_dict(self) -> dict:
        """What the order depends on (for checkpoints)."""
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(state["epoch"])
        self.skip(int(state.get("start", 0)))


@SAMPLERS.register("instance")
class InstanceSampler(EpochSampler):
    """Instance-balanced sampling (q = 1): a fresh random permutation of the training set every epoch."""

    def indices(self) -> np.ndarray:
        return self._rng().permutation(len(self.labels)).astype(np.int64)


class ClassPowerSampler(EpochSampler):
    """Multinomial sampling with replacement, ``p_j = n_j^q / sum_i n_i^q`` split evenly over class j's samples.

    Each epoch draws N = len(labels) indices, so an epoch has the usual number of steps.

    Args:
        labels: (N,) labels.
        seed: base seed.
        num_epochs: total epochs.
        q: the exponent (0 class-balanced, 1/2 square-root, 1 instance-balanced in expectation).
    """

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1, q: float = 0.0) -> None:
        super().__init__(labels, seed, num_epochs)
        self.q = float(q)

    def class_probs(self) -> np.ndarray:
        """(C,) class sampling probabilities at the current epoch (classes with no samples get 0)."""
        return _power_probs(self.counts, self.q)

    def indices(self) -> np.ndarray:
        p_class = self.class_probs()
        # per-sample probability: the class mass shared evenly by its samples, (N,)
        p = p_class[self.labels] / self.counts[self.labels]
        p = p / p.sum()
        return self._rng().choice(len(self.labels), size=len(self.labels), replace=True, p=p).astype(np.int64)


def _power_probs(counts: np.ndarray, q: float) -> np.ndarray:
    present = counts > 0
    w = np.zeros(len(counts), dtype=np.float64)
    w[present] = counts[present].astype(np.float64) ** q
    return w / w.sum()


@SAMPLERS.register("class_balanced")
class ClassBalancedSampler(ClassPowerSampler):
    """Class-balanced sampling (q = 0): every class equally likely."""

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1) -> None:
        super().__init__(labels, seed, num_epochs, q=0.0)


@SAMPLERS.register("sqrt")
class SqrtSampler(ClassPowerSampler):
    """Square-root sampling (q = 1/2)."""

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1) -> None:
        super().__init__(labels, seed, num_epochs, q=0.5)


@SAMPLERS.register("progressive")
class ProgressiveSampler(ClassPowerSampler):
    """Progressively balanced sampling: ``p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB``.

    ``t`` is the 0-based epoch and ``T = num_epochs``, so epoch 0 is instance-balanced and the last epoch is
    ``(T-1)/T`` of the way to class-balanced (the paper's formula with t counted from 0).
    """

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1) -> None:
        if num_epochs < 1:
            raise ValueError(f"progressive sampling needs num_epochs >= 1, got {num_epochs}")
        super().__init__(labels, seed, num_epochs)

    def class_probs(self) -> np.ndarray:
        t = min(max(self.epoch / self.num_epochs, 0.0), 1.0)
        return (1.0 - t) * _power_probs(self.counts, 1.0) + t * _power_probs(self.counts, 0.0)


@SAMPLERS.register("class_aware")
class ClassAwareSampler(EpochSampler):
    """classifier-balancing's ``ClassAwareSampler`` (METHODS.md §5.2).

    Classes are visited in shuffled round-robin order (a cycle over the class ids reshuffled at every wrap); each
    visit yields ``num_samples_cls`` consecutive indices from that class's own cycle (reshuffled at every wrap), so
    batches hold runs of ``num_samples_cls`` same-class samples. An epoch has ``max_c n_c * C`` indices (C = classes
    present); the last run is cut if that is not a multiple of ``num_samples_cls``, as in the official generator.

    Departure: the official ``RandomCycleIter`` objects (Python ``random``) keep their position across epochs, so an
    epoch's order depends on how far earlier epochs were consumed (DataLoader prefetching included). Here every
    epoch starts fresh cycles from ``default_rng([seed, epoch])``; within an epoch the process is the official one
    (each cycle is shuffled before its first element and at every wrap), and the order is reproducible on resume.

    Args:
        labels: (N,) labels.
        seed: base seed.
        num_epochs: unused (kept for the common signature).
        num_samples_cls: run length per class visit (the configs use 4).
    """

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1, num_samples_cls: int = 4) -> None:
        super().__init__(labels, seed, num_epochs)
        if num_samples_cls < 1:
            raise ValueError(f"num_samples_cls must be >= 1, got {num_samples_cls}")
        self.num_samples_cls = int(num_samples_cls)
        self.classes = np.flatnonzero(self.counts > 0)
        self.num_samples = int(self.counts.max()) * len(self.classes)

    @staticmethod
    def _cycle(rng: np.random.Generator, items: np.ndarray, n: int) -> np.ndarray:
        """First ``n`` items of a cycle through ``items`` that reshuffles before the first item and at each wrap."""
        reps = -(-n // len(items))  # ceil
        return np.concatenate([rng.permutation(items) for _ in range(reps)])[:n]

    def indices(self) -> np.ndarray:
        rng = self._rng()
        k = self.num_samples_cls
        num_runs = -(-self.num_samples // k)
        run_classes = self._cycle(rng, self.classes, num_runs)  # (R,) class of each run
        runs = np.empty((num_runs, k), dtype=np.int64)  # (R, k) dataset indices
        for c in self.classes:
            mask = run_classes == c
            r_c = int(mask.sum())
            if r_c:
                members = np.flatnonzero(self.labels == c)
                runs[mask] = self._cycle(rng, members, r_c * k).reshape(r_c, k)
        return runs.reshape(-1)[: self.num_samples]


@SAMPLERS.register("cbd")
class CBDSampler(EpochSampler):
    """Class-balanced over/under-sampling of CBD's official input pipeline (METHODS.md §7.3).

    With ``ratio_c = (1/C) / (n_c/N)``, every example is repeated ``floor(r) + Bernoulli(max(r, 1) - floor(r))``
    times (head classes, r < 1, get exactly one copy), then each copy is kept with probability ``min(r, 1)``, and the
    result is shuffled. The expected count per class is N/C; the draws are redone every epoch, so the epoch length
    varies: ``len()`` is the current epoch's length (after :meth:`set_epoch`). C counts the classes present. The
    official 1000-element shuffle buffer is replaced by a full shuffle.
    """

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1) -> None:
        super().__init__(labels, seed, num_epochs)
        present = self.counts > 0
        C, N = int(present.sum()), len(self.labels)
        self.ratio = np.zeros(len(self.counts), dtype=np.float64)  # (C,) ratio per class id
        self.ratio[present] = (1.0 / C) / (self.counts[present] / N)

    def indices(self) -> np.ndarray:
        rng = self._rng()
        r = self.ratio[self.labels]  # (N,) ratio of each example's class
        fl = np.floor(r)
        copies = (fl + (rng.random(len(r)) < (np.maximum(r, 1.0) - fl))).astype(np.int64)
        idx = np.repeat(np.arange(len(r), dtype=np.int64), copies)
        keep = rng.random(len(idx)) < np.minimum(r[idx], 1.0)
        return rng.permutation(idx[keep])


@SAMPLERS.register("repeated_aug")
class RepeatedAugSampler(EpochSampler):
    """Repeated augmentation of DeiT / DeiT-LT (``RASampler``, METHODS.md §6.3), on one process.

    A cycle is a random permutation of the N training indices with every index repeated ``num_repeats`` times in a
    row (``repeat_interleave``: the copies of one image land in the same batch, each with its own augmentation).
    An epoch is the first ``L`` entries of the cycle. Official ``L = floor(N // 256 · 256 / world)``, so about a
    third of the images are seen per epoch, each about 3 times. Departure: for N < 256 the official length is 0 (an
    empty epoch); here it is then N.

    Args:
        num_repeats: copies of each index per cycle (3).
        epoch_length: ``'official'`` (above), ``'cycle'`` (all N · num_repeats entries) or a positive integer.
    """

    def __init__(self, labels, seed: int = 0, num_epochs: int = 1, num_repeats: int = 3,
                 epoch_length: str | int = "official") -> None:
        super().__init__(labels, seed, num_epochs)
        if num_repeats < 1:
            raise ValueError(f"repeated_aug num_repeats must be >= 1, got {num_repeats}")
        self.num_repeats = int(num_repeats)
        n = len(self.labels)
        if epoch_length == "official":
            self.length = n // 256 * 256 or n
        elif epoch_length == "cycle":
            self.length = n * self.num_repeats
        elif isinstance(epoch_length, int) and not isinstance(epoch_length, bool) and epoch_length > 0:
            self.length = min(int(epoch_length), n * self.num_repeats)
        else:
            raise ValueError(f"repeated_aug epoch_length {epoch_length!r}; valid: official, cycle, or an integer > 0")

    def cycle(self) -> np.ndarray:
        """(N · num_repeats,) the current epoch's full cycle: each index ``num_repeats`` times in a row."""
        return np.repeat(self._rng().permutation(len(self.labels)).astype(np.int64), self.num_repeats)

    def indices(self) -> np.ndarray:
        return self.cycle()[: self.length]


def create_sampler(name: str, *, labels, seed: int, num_epochs: int, **kwargs) -> EpochSampler:
    """Build the sampler registered as ``name`` (``SAMPLERS.names()`` lists them).

    Args:
        name: instance, class_balanced, sqrt, progressive, class_aware, cbd or repeated_aug.
        labels: (N,) training labels.
        seed: base seed of the per-epoch order.
        num_epochs: total epochs of the run.
        **kwargs: sampler options (e.g. ``num_samples_cls`` for class_aware).
    """
    return SAMPLERS.create(name, labels=labels, seed=seed, num_epochs=num_epochs, **kwargs)
