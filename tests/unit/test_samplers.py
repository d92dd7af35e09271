"""Samplers: class frequencies against Kang et al. Eq. 1-2, ClassAwareSampler runs, CBD over/under-sampling."""

import numpy as np
import pytest

from pipeline.data.samplers import SAMPLERS, create_sampler
from pipeline.registry import UnknownNameError

COUNTS = [400, 100, 25, 4]
LABELS = np.repeat(np.arange(4), COUNTS)  # N = 529


def _freq(sampler, epochs=range(5)):
    hits = np.zeros(4)
    for e in epochs:
        sampler.set_epoch(e)
        hits += np.bincount(LABELS[list(sampler)], minlength=4)
    return hits / hits.sum()


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_is_deterministic_per_seed_and_epoch(name):
    a = create_sampler(name, labels=LABELS, seed=7, num_epochs=10)
    b = create_sampler(name, labels=LABELS, seed=7, num_epochs=10)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b) == list(a)  # same (seed, epoch) -> same order, also when iterated twice
    assert len(a) == len(first)
    assert all(isinstance(i, int) and 0 <= i < len(LABELS) for i in first)
    a.set_epoch(4)
    assert list(a) != first
    c = create_sampler(name, labels=LABELS, seed=8, num_epochs=10)
    c.set_epoch(3)
    assert list(c) != first
    # resuming: a fresh sampler set to epoch 3 reproduces epoch 3 of one that ran epochs 0..3
    d = create_sampler(name, labels=LABELS, seed=7, num_epochs=10)
    for e in range(4):
        d.set_epoch(e)
        last = list(d)
    assert last == first


def test_instance_is_a_permutation():
    s = create_sampler("instance", labels=LABELS, seed=0, num_epochs=1)
    assert sorted(s) == list(range(len(LABELS)))


def test_class_balanced_is_uniform_over_classes():
    s = create_sampler("class_balanced", labels=LABELS, seed=0, num_epochs=1)
    assert len(s) == len(LABELS)
    np.testing.assert_allclose(_freq(s, range(20)), [0.25] * 4, atol=0.01)


def test_sqrt_is_proportional_to_sqrt_counts():
    s = create_sampler("sqrt", labels=LABELS, seed=0, num_epochs=1)
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()  # [20, 10, 5, 2] / 37
    np.testing.assert_allclose(s.class_probs(), expected)
    np.testing.assert_allclose(_freq(s, range(20)), expected, atol=0.01)


def test_progressive_endpoints_and_midpoint():
    s = create_sampler("progressive", labels=LABELS, seed=0, num_epochs=10)
    ib = np.array(COUNTS) / sum(COUNTS)
    s.set_epoch(0)
    np.testing.assert_allclose(s.class_probs(), ib)
    s.set_epoch(5)
    np.testing.assert_allclose(s.class_probs(), 0.5 * ib + 0.5 * 0.25)
    s.set_epoch(10)
    np.testing.assert_allclose(s.class_probs(), [0.25] * 4)
    np.testing.assert_allclose(_freq(s, [10]), [0.25] * 4, atol=0.05)


def test_class_aware_runs_and_cycles():
    k = 4
    s = create_sampler("class_aware", labels=LABELS, seed=1, num_epochs=1, num_samples_cls=k)
    idx = np.array(list(s))
    assert len(idx) == len(s) == max(COUNTS) * 4  # max_c n_c * C
    runs = LABELS[idx].reshape(-1, k)
    assert (runs == runs[:, :1]).all()  # runs of k same-class samples
    # classes in shuffled round-robin: every block of C consecutive runs visits each class once
    run_cls = runs[:, 0]
    for b in range(len(run_cls) // 4):
        assert sorted(run_cls[4 * b : 4 * b + 4]) == [0, 1, 2, 3]
    # each class's stream is a concatenation of permutations of its members
    for c, n_c in enumerate(COUNTS):
        stream = idx[LABELS[idx] == c]
        members = sorted(np.flatnonzero(LABELS == c))
        full = len(stream) // n_c
        for j in range(full):
            assert sorted(stream[j * n_c : (j + 1) * n_c]) == members
        assert len(set(stream[full * n_c :])) == len(stream) - full * n_c  # partial cycle: no repeats


def test_class_aware_cuts_last_run():
    labels = np.repeat([0, 1], [5, 2])  # length 5 * 2 = 10, runs of 4 -> the third run is cut to 2
    s = create_sampler("class_aware", labels=labels, seed=0, num_epochs=1, num_samples_cls=4)
    idx = list(s)
    assert len(idx) == 10
    with pytest.raises(ValueError, match="num_samples_cls"):
        create_sampler("class_aware", labels=labels, seed=0, num_epochs=1, num_samples_cls=0)


def test_cbd_expected_count_per_class_is_n_over_c():
    s = create_sampler("cbd", labels=LABELS, seed=0, num_epochs=1)
    np.testing.assert_allclose(s.ratio, (1 / 4) / (np.array(COUNTS) / len(LABELS)))
    per_class, lengths = [], []
    for e in range(200):
        s.set_epoch(e)
        idx = list(s)
        lengths.append(len(s))
        assert len(idx) == len(s)
        per_class.append(np.bincount(LABELS[idx], minlength=4))
    mean = np.mean(per_class, axis=0)
    # N / C = 132.25 per class; std of the mean over 200 epochs is < 1 for every class
    np.testing.assert_allclose(mean, [len(LABELS) / 4] * 4, atol=3.0)
    assert len(set(lengths)) > 1  # the length is redrawn every epoch
    # the tail class (ratio 33.06) gets 33 or 34 copies of every example, never filtered out
    s.set_epoch(0)
    tail = np.bincount(np.array(list(s))[LABELS[list(s)] == 3], minlength=len(LABELS))[LABELS == 3]
    assert set(tail) <= {33, 34}


def test_unknown_and_bad_labels():
    with pytest.raises(UnknownNameError, match="class_balanced"):
        create_sampler("balanced", labels=LABELS, seed=0, num_epochs=1)
    with pytest.raises(ValueError, match="non-empty"):
        create_sampler("instance", labels=[], seed=0, num_epochs=1)
