"""Shot-group accuracy against hand-computed values and the official shot_acc rule (METHODS.md §1.3, §9.2)."""

import math

import numpy as np
import pytest
import torch

from pipeline.evaluate.metrics import mean_std, per_class_accuracy, shot_accuracy, shot_groups


def test_thresholds_are_train_counts_with_100_and_20_medium():
    assert shot_groups([101, 100, 50, 20, 19]).tolist() == ["many", "medium", "medium", "medium", "few"]


def test_hand_computed_groups():
    # classes: 0 many (200 train), 1 medium (100), 2 medium (20), 3 few (19)
    train_counts = [200, 100, 20, 19]
    targets = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    preds = np.array([0, 0, 1, 0, 2, 2, 0, 0])  # per class: 1, 0.5, 1, 0
    out = shot_accuracy(preds, targets, train_counts)
    assert out["many"] == pytest.approx(1.0)
    assert out["medium"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["few"] == pytest.approx(0.0)
    assert out["all"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)


def test_all_is_macro_and_equals_micro_on_balanced_test():
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(5), 10)
    preds = np.where(rng.random(50) < 0.6, targets, rng.integers(0, 5, 50))
    out = shot_accuracy(preds, targets, [500, 300, 50, 10, 5])
    assert out["all"] == pytest.approx((preds == targets).mean())
    # unbalanced test set: macro, not micro
    targets = np.array([0, 0, 0, 1])
    preds = np.array([0, 0, 0, 0])
    assert shot_accuracy(preds, targets, [500, 5])["all"] == pytest.approx(0.5)


def test_logits_are_argmaxed_and_torch_accepted():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    out = shot_accuracy(logits, torch.tensor([0, 1, 1]), [200, 10])
    assert out["many"] == 1.0 and out["few"] == 0.5


def test_empty_group_is_nan_not_zero():
    out = shot_accuracy(np.array([0, 1]), np.array([0, 1]), [500, 300])
    assert out["many"] == 1.0
    assert math.isnan(out["medium"]) and math.isnan(out["few"])


def test_classes_absent_from_targets_are_ignored():
    # class 2 (few) has no test sample: the few group is empty even though a class is few in training
    out = shot_accuracy(np.array([0, 1]), np.array([0, 1]), [500, 50, 5])
    assert math.isnan(out["few"]) and out["all"] == 1.0


def test_per_class_accuracy_nan_for_absent():
    acc = per_class_accuracy(np.array([0, 1, 1]), np.array([0, 0, 1]), 3)
    assert acc[0] == 0.5 and acc[1] == 1.0 and math.isnan(acc[2])


def test_per_class_accuracy_rejects_out_of_range():
    with pytest.raises(ValueError, match="targets must lie"):
        per_class_accuracy(np.array([0]), np.array([3]), 3)


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_gap_closed_by_hand() -> None:
    """(model − CE long-tailed) / (CE balanced − CE long-tailed) per group; a gap under one point has no share."""
    from pipeline.evaluate.report import gap_closed

    models = {
        "teachers/ce": {"all": 0.70, "many": 0.99, "medium": 0.70, "few": 0.40},
        "upper_bound/ce": {"all": 0.90, "many": 0.995, "medium": 0.90, "few": 0.90},
        "students/x": {"all": 0.80, "many": 0.98, "medium": 0.60, "few": 0.65},
    }
    gap = gap_closed(models)
    assert gap["baseline"] == "teachers/ce" and gap["upper_bound"] == "upper_bound/ce"
    x = gap["models"]["students/x"]
    assert x["all"] == pytest.approx(0.5) and x["few"] == pytest.approx(0.5) and x["medium"] == pytest.approx(-0.5)
    assert math.isnan(x["many"])  # 0.5 points of gap: none
    assert gap["models"]["upper_bound/ce"]["all"] == pytest.approx(1.0)
    assert gap["models"]["teachers/ce"]["few"] == pytest.approx(0.0)
    assert gap_closed({k: v for k, v in models.items() if k != "upper_bound/ce"}) == {}


def test_wilson_interval_matches_hand_computation() -> None:
    from pipeline.evaluate.intervals import wilson_interval

    # 90 of 100, z = 1.96: centre (0.9 + 0.019208) / 1.038416 = 0.885212, half 1.96·sqrt(0.0009 + 0.0000960)/1.038416
    low, high = wilson_interval(90, 100, z=1.96)
    assert low == pytest.approx(0.8256, abs=1e-4) and high == pytest.approx(0.9448, abs=1e-4)
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0  # stays inside [0, 1]
    edge = (1.96**2 / 50) / (1 + 1.96**2 / 50)  # p = 0: the upper bound is z²/n / (1 + z²/n)
    assert wilson_interval(0, 50, z=1.96)[1] == pytest.approx(edge)
    assert wilson_interval(50, 50, z=1.96)[0] == pytest.approx(1 - edge)
    assert np.isnan(wilson_interval(0, 0)[0])
    with pytest.raises(ValueError, match="correct=11"):
        wilson_interval(11, 10)


def test_paired_difference_counts_only_disagreements() -> None:
    from pipeline.evaluate.intervals import paired_difference

    a = np.array([1, 1, 1, 0, 1, 0, 1, 1], dtype=bool)
    b = np.array([1, 1, 0, 0, 1, 1, 0, 1], dtype=bool)
    out = paired_difference(a, b, z=2.0)
    d = np.array([0, 0, 1, 0, 0, -1, 1, 0], dtype=float)  # by hand
    se = d.std(ddof=1) / np.sqrt(8)
    assert out["diff"] == pytest.approx(0.125) and out["se"] == pytest.approx(se)
    assert out["low"] == pytest.approx(0.125 - 2 * se) and out["high"] == pytest.approx(0.125 + 2 * se)
    same = paired_difference(a, a)
    assert same["diff"] == 0.0 and same["low"] == 0.0 == same["high"]  # identical models: a zero-width interval
