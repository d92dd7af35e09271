"""pipeline.rebalance end to end on a tiny trained teacher: each method writes the stage contract's files, and each
keeps what the method keeps (cRT/LWS/learned τ train only the head; τ-norm and NCM only read features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import RebalanceConfig
from pipeline.evaluate.posthoc import ncm_centroids, ncm_logits
from pipeline.evaluate.predict import load_features, load_predictions
from pipeline.models.network import load_network
from pipeline.rebalance import rebalance
from pipeline.train.run import train_and_export


@pytest.fixture
def teacher(make_train_config, build_ctx) -> Path:
    out = build_ctx.data_root / "teachers" / "t"
    train_and_export(make_train_config(epochs=2), build_ctx, out, build_ctx.data_root / "ckpt_t")
    return out


def _run(build_ctx, tmp_path: Path, make_train_config, **kw) -> tuple[dict, Path]:
    train = make_train_config(epochs=1, sampler="class_aware", sampler_args={"num_samples_cls": 2})
    cfg = RebalanceConfig(model="teachers/t", train=train, **kw)
    out = tmp_path / "out"
    return rebalance(cfg, build_ctx, out, tmp_path / "ckpt"), out


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("backbone.") and "running" not in k
            and "num_batches" not in k}


@pytest.mark.parametrize("method", ["crt", "lws"])
def test_trained_heads_leave_the_backbone_alone(method, teacher, build_ctx, tmp_path, make_train_config) -> None:
    summary, out = _run(build_ctx, tmp_path, make_train_config, method=method, update_bn=False)
    for name in ("model.pt", "model.json", "metrics.json", "predictions.npz", "features.npz"):
        assert (out / name).is_file()
    src, new = load_network(teacher).state_dict(), load_network(out).state_dict()
    assert all(torch.equal(v, new[k]) for k, v in _backbone(src).items())
    if method == "lws":  # W and b of the joint classifier frozen; only the scales moved
        assert torch.equal(src["head.weight"], new["head.fc.weight"])
        assert torch.equal(src["head.bias"], new["head.fc.bias"])
        assert not torch.equal(new["head.scales"], torch.ones_like(new["head.scales"]))
    assert set(summary["test"]["main"]) == {"all", "many", "medium", "few"}


def test_learned_tau_moves_tau_only(teacher, build_ctx, tmp_path, make_train_config) -> None:
    summary, out = _run(build_ctx, tmp_path, make_train_config, method="tau_norm", tau_select="learn",
                        update_bn=False)
    net = load_network(out)
    src = load_network(teacher)
    assert torch.equal(net.head.weight, src.head.weight)
    assert summary["tau"] == pytest.approx(float(net.head.tau.detach())) and summary["tau"] != 1.0


@pytest.mark.parametrize("rule", ["val", "train_balanced"])
def test_tau_norm_picks_tau_from_the_sweep_and_never_from_test(rule, teacher, build_ctx, tmp_path,
                                                               make_train_config) -> None:
    summary, out = _run(build_ctx, tmp_path, make_train_config, method="tau_norm", tau_select=rule)
    sweep = summary["sweep"]
    split = "val" if rule == "val" else "train"
    best = max(row[split]["all"] for row in sweep)
    chosen = next(row for row in sweep if row["tau"] == summary["tau"])
    assert chosen[split]["all"] == best
    assert [row["tau"] for row in sweep] == pytest.approx([0.1 * i for i in range(21)])
    # the written logits are x · τnorm(W)ᵀ on the teacher's test features, bias dropped
    feats, w = load_features(teacher), load_network(teacher).head.weight.detach().numpy()
    w_t = w / np.linalg.norm(w, axis=1, keepdims=True) ** summary["tau"]
    np.testing.assert_allclose(load_predictions(out)["test/main"], feats["test"] @ w_t.T, rtol=1e-4, atol=1e-5)
    assert (out / "tau_sweep.png").is_file()


def test_ncm_logits_match_the_posthoc_definition(teacher, build_ctx, tmp_path, make_train_config) -> None:
    _, out = _run(build_ctx, tmp_path, make_train_config, method="ncm", ncm_feat="cl2n", ncm_dist="l2")
    feats = load_features(teacher)
    c, mean = ncm_centroids(feats["train"], feats["train_labels"], build_ctx.num_classes, "cl2n")
    expected = ncm_logits(feats["test"], c, mean, "cl2n", "l2")
    np.testing.assert_allclose(load_predictions(out)["test/main"], expected, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "metrics.json").read_text())["feat_type"] == "cl2n"
