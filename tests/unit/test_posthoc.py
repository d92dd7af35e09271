"""τ-normalisation sweep, τ choice and NCM against hand-computed toy cases (METHODS.md §5.4, §5.6, §9.10, §9.12)."""

import numpy as np
import pytest

from pipeline.evaluate.posthoc import DEFAULT_TAUS, choose_tau, ncm_centroids, ncm_logits, tau_sweep


def _toy():
    # Class 0 (head) has a big weight norm, class 1 (tail) a small one: joint logits favour the head.
    weight = np.array([[4.0, 0.0], [0.0, 1.0]])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.5], [0.2, 0.6]])
    y = np.array([0, 1, 1, 1])
    return weight, x, y


def test_grid_has_21_values():
    assert len(DEFAULT_TAUS) == 21 and DEFAULT_TAUS[0] == 0 and DEFAULT_TAUS[-1] == 2


def test_tau_zero_is_joint_and_tau_one_helps_tail():
    weight, x, y = _toy()
    sweep = tau_sweep(weight, {"val": x}, {"val": y}, train_counts=[500, 10], taus=[0.0, 1.0])
    joint = (x @ weight.T).argmax(1)  # [0, 1, 0, 0] → per class acc 1, 1/3
    assert sweep[0]["tau"] == 0.0
    assert sweep[0]["val"]["all"] == pytest.approx((1 + np.mean(joint[1:] == 1)) / 2)
    # τ = 1: unit-norm rows, logits = cosines·‖x‖ → all correct
    assert sweep[1]["val"]["all"] == pytest.approx(1.0)
    assert sweep[1]["val"]["few"] == 1.0 and np.isnan(sweep[1]["val"]["medium"])


def test_choose_tau_rules_and_ties():
    sweep = [
        {"tau": 0.0, "val": {"all": 0.5}, "train": {"all": 0.7}},
        {"tau": 0.5, "val": {"all": 0.8}, "train": {"all": 0.9}},
        {"tau": 1.0, "val": {"all": 0.8}, "train": {"all": 0.6}},
    ]
    assert choose_tau(sweep, "val") == 0.5  # tie 0.5 / 1.0 → smallest
    assert choose_tau(list(reversed(sweep)), "val") == 0.5
    assert choose_tau(sweep, "train_balanced") == 0.5
    with pytest.raises(ValueError, match="valid rules"):
        choose_tau(sweep, "test")


def test_choose_tau_train_balanced_is_mean_per_class_train_accuracy():
    weight, x, y = _toy()
    sweep = tau_sweep(weight, {"train": x}, {"train": y}, [500, 10], taus=np.linspace(0, 2, 21))
    best = max(row["train"]["all"] for row in sweep)
    expected = min(row["tau"] for row in sweep if row["train"]["all"] == best)
    assert choose_tau(sweep, "train_balanced") == expected
    assert sweep[0]["train"]["all"] < best  # the joint classifier (τ = 0) is not the balanced optimum here
    with pytest.raises(ValueError, match="'val' split"):
        choose_tau(sweep, "val")


def test_ncm_centroids_not_renormalised():
    feats = np.array([[3.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    labels = np.array([0, 0, 1])
    c, mean = ncm_centroids(feats, labels, 2, "l2n")
    np.testing.assert_allclose(c, [[0.5, 0.5], [0.0, 1.0]])  # norm of class 0 centroid is 0.707, kept
    np.testing.assert_allclose(mean, [1.0, 5.0 / 3.0])
    c_un, _ = ncm_centroids(feats, labels, 2, "un")
    np.testing.assert_allclose(c_un, [[1.5, 1.5], [0.0, 2.0]])
    c_cl, _ = ncm_centroids(feats, labels, 2, "cl2n")
    centred = feats - mean
    z = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(c_cl, [(z[0] + z[1]) / 2, z[2]])


def test_ncm_logits_l2_and_cos_by_hand():
    c = np.array([[1.0, 0.0], [0.0, 2.0]])
    x = np.array([[1.0, 1.0]])
    l2 = ncm_logits(x, c, np.zeros(2), "un", "l2")
    np.testing.assert_allclose(l2, [[-1.0, -2.0]])  # −squared distances: (0²+1²), (1²+1²)
    cos = ncm_logits(x, c, np.zeros(2), "un", "cos")
    np.testing.assert_allclose(cos, [[1.0 / 2, 2.0 / 2]])  # dot / D, D = 2
    # l2n: x is normalised first
    l2n = ncm_logits(x, c, np.zeros(2), "l2n", "l2")
    xn = x / np.sqrt(2)
    np.testing.assert_allclose(l2n, -((xn[:, None, :] - c[None]) ** 2).sum(-1), rtol=1e-6)


def test_ncm_errors():
    with pytest.raises(ValueError, match="valid types"):
        ncm_centroids(np.ones((2, 2)), np.array([0, 1]), 2, "bad")
    with pytest.raises(ValueError, match=r"without training samples.*\[2\]"):
        ncm_centroids(np.ones((2, 2)), np.array([0, 1]), 3, "un")
    with pytest.raises(ValueError, match="valid types"):
        ncm_logits(np.ones((1, 2)), np.ones((2, 2)), np.zeros(2), "un", "dot")
