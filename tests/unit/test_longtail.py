"""Long-tail profiles, the official LDAM-DRW subsampling, shot groups and balanced splits (METHODS.md §1, §9.1-2)."""

import numpy as np
import pytest

from pipeline.data.longtail import balanced_split, longtail_counts, shot_groups, subsample_indices

CIFAR100_IF100 = [
    500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237, 226, 216, 206,
    197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107, 102, 98, 93, 89, 85, 81, 77, 74, 70, 67, 64,
    61, 58, 56, 53, 51, 48, 46, 44, 42, 40, 38, 36, 35, 33, 32, 30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
    15, 15, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5,
]  # fmt: skip


@pytest.mark.parametrize(
    "n_max, C, IF, total, tail",
    [
        (5000, 10, 100, 12406, 50),
        (5000, 10, 50, 13996, 100),
        (5000, 10, 10, 20431, 500),
        (500, 100, 100, 10847, 5),
        (500, 100, 50, 12608, 10),
        (500, 100, 10, 19573, 50),
    ],
)
def test_exp_totals_match_official(n_max, C, IF, total, tail):
    counts = longtail_counts(n_max, C, IF)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == tail
    assert all(a >= b for a, b in zip(counts[:-1], counts[1:], strict=True))


def test_exp_full_lists():
    assert longtail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert longtail_counts(500, 100, 100) == CIFAR100_IF100
    # the official img_max is the float len(train)/C; it gives the same counts as the int
    assert longtail_counts(500.0, 100, 100) == CIFAR100_IF100


def test_step_pareto_none_profiles():
    assert longtail_counts(500, 10, 10, "step") == [500] * 5 + [50] * 5
    assert longtail_counts(500, 5, 10, "step") == [500] * 2 + [50] * 3
    p = longtail_counts(500, 100, 100, "pareto")
    assert p[0] == 500 and p[-1] == 5 and p[1] == int(500 * 2**-1.0)  # a = log 100 / log 100 = 1
    assert all(a >= b for a, b in zip(p[:-1], p[1:], strict=True))
    assert longtail_counts(7, 3, 5, "none") == [7, 7, 7]


def test_single_class_and_if_one():
    assert longtail_counts(40, 1, 100) == [40]
    assert longtail_counts(40, 4, 1) == [40] * 4


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="imbalance_factor"):
        longtail_counts(500, 10, 0.5)
    with pytest.raises(ValueError, match=r"class 9 would get 0 images"):
        longtail_counts(99, 10, 100)
    with pytest.raises(ValueError, match="valid profiles"):
        longtail_counts(50, 10, 10, "zipf")


def _official_gen_imbalanced(targets, counts, rand_number):
    # LDAM-DRW imbalance_cifar.py gen_imbalanced_data, re-typed: global seed, np.random.shuffle per class
    state = np.random.get_state()
    try:
        np.random.seed(rand_number)
        out = []
        for c, n in zip(np.unique(targets), counts, strict=True):
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            out.append(idx[:n])
        return np.concatenate(out)
    finally:
        np.random.set_state(state)


def test_subsample_matches_official_and_spares_global_rng():
    labels = np.random.default_rng(3).integers(0, 10, size=3000)
    counts = longtail_counts(250, 10, 20)
    before = np.random.get_state()[1].copy()
    got = subsample_indices(labels, counts, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG untouched
    assert np.array_equal(got, _official_gen_imbalanced(labels, counts, 0))
    assert np.array_equal(np.bincount(labels[got], minlength=10), counts)
    assert not np.array_equal(got, subsample_indices(labels, counts, seed=1))
    with pytest.raises(ValueError, match="class 0 has"):
        subsample_indices(labels, [10_000] + counts[1:], seed=0)


def test_shot_groups_thresholds():
    assert shot_groups([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]
    g = shot_groups(CIFAR100_IF100)
    assert (g.count("many"), g.count("medium"), g.count("few")) == (35, 35, 30)
    assert g[34] == "many" and g[35] == "medium" and g[69] == "medium" and g[70] == "few"
    g10 = shot_groups(longtail_counts(5000, 10, 100))
    assert (g10.count("many"), g10.count("medium"), g10.count("few")) == (8, 2, 0)
    assert shot_groups([5, 50], many=40, few=10) == ["few", "many"]


def test_balanced_split():
    labels = np.repeat(np.arange(4), [10, 7, 5, 9])
    taken, rest = balanced_split(labels, 3, seed=0)
    assert np.array_equal(np.bincount(labels[taken]), [3, 3, 3, 3])
    assert len(set(taken) | set(rest)) == len(labels) and not set(taken) & set(rest)
    assert np.array_equal(rest, np.sort(rest))
    t2, _ = balanced_split(labels, 3, seed=0)
    assert np.array_equal(taken, t2)
    empty, all_rest = balanced_split(labels, 0, seed=0)
    assert len(empty) == 0 and len(all_rest) == len(labels)
    with pytest.raises(ValueError, match="class 2 has 5"):
        balanced_split(labels, 6, seed=0)
