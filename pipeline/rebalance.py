"""Decoupled rebalancing of a trained model (Kang et al., ICLR 2020; facebookresearch/classifier-balancing).

- ``crt``: re-initialised linear classifier, trained with class-aware sampling on the frozen representation (§5.3).
- ``lws``: per-class scales over the frozen classifier, trained the same way (§5.5).
- ``tau_norm``: ``w_i / ||w_i||^τ`` with the bias dropped (§5.4); τ swept over 0..2 and chosen on val, or on the
  training set by the simulated-balanced rule (Kang et al. B.5), or learned (``tau_select: learn``).
- ``ncm``: nearest class mean over the training features (§5.6), ``un`` / ``l2n`` / ``cl2n``, ``l2`` / ``cos``.

Sweeps and NCM run on the model's stored ``features.npz`` (computed with the test transform: the official
``train_plain``); trained heads go through the one Trainer with the Decoupled method.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.build import BuildContext, model_dir
from pipeline.config import RebalanceConfig
from pipeline.evaluate.metrics import shot_accuracy
from pipeline.evaluate.posthoc import choose_tau, ncm_centroids, tau_sweep
from pipeline.evaluate.predict import load_features
from pipeline.io import atomic_dir, write_json
from pipeline.models.heads import class_weight
from pipeline.models.network import Network, load_network, save_network
from pipeline.train.methods.decoupled import Decoupled
from pipeline.train.run import fit_method, write_outputs
from pipeline.train.trainer import seed_everything

logger = logging.getLogger(__name__)


def _with_head(source: Network, head: dict) -> Network:
    """A copy of ``source`` (backbone and neck weights) with a new head built from ``head``."""
    spec = copy.deepcopy(source.spec)
    spec["head"] = head
    net = Network(spec)
    own = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    net.load_state_dict(own, strict=False)
    return net


def _feature_outputs(net: Network, feats: dict[str, np.ndarray], ctx: BuildContext, out_dir: Path,
                     extra: dict) -> dict:
    """Write the model, predictions and metrics of a head applied to stored features."""
    d = ctx.dataset
    preds, metrics = {}, {}
    with torch.no_grad():
        for split in ("val", "test"):
            if split not in feats or len(feats[split]) == 0:
                continue
            z = net.forward_head(torch.from_numpy(feats[split]).float()).numpy()
            preds[f"{split}/main"], preds[f"{split}_labels"] = z, feats[f"{split}_labels"]
            metrics[split] = {"main": shot_accuracy(z.argmax(1), feats[f"{split}_labels"], ctx.class_counts,
                                                    many=d.many, few=d.few)}
    summary = {"heads": ["main"], "test": metrics.get("test", {}), "val": metrics.get("val", {}), **extra}
    with atomic_dir(out_dir) as tmp:
        save_network(net, tmp)
        np.savez(tmp / "predictions.npz", **preds)
        np.savez(tmp / "features.npz", **feats)
        write_json(tmp / "metrics.json", summary)
        if "sweep" in extra:
            from pipeline.evaluate.plots import plot_tau_sweep

            plot_tau_sweep(extra["sweep"], tmp / "tau_sweep.png", split="val" if "val" in extra["sweep"][0] else "test")
    return summary


def _tau_posthoc(cfg: RebalanceConfig, src: Network, feats: dict, ctx: BuildContext, out_dir: Path) -> dict:
    w = class_weight(src.head).detach().float()
    splits = [s for s in ("train", "val", "test") if s in feats and len(feats[s])]
    d = ctx.dataset
    sweep = tau_sweep(w.numpy(), {s: feats[s] for s in splits}, {s: feats[f"{s}_labels"] for s in splits},
                      ctx.class_counts, taus=cfg.taus, many=d.many, few=d.few)
    if cfg.tau_select == "val" and "val" not in splits:
        raise ValueError("rebalance tau_select 'val' needs a val split (dataset.val_per_class > 0); "
                         "use tau_select: train_balanced")
    tau = choose_tau(sweep, cfg.tau_select)
    logger.info("tau = %.2f chosen by %s", tau, cfg.tau_select)
    net = _with_head(src, {"name": "tau_norm", "tau": tau})
    net.head.weight.copy_(w)
    return _feature_outputs(net, feats, ctx, out_dir, {"tau": tau, "tau_select": cfg.tau_select, "sweep": sweep})


def _ncm(cfg: RebalanceConfig, src: Network, feats: dict, ctx: BuildContext, out_dir: Path) -> dict:
    centroids, featmean = ncm_centroids(feats["train"], feats["train_labels"], ctx.num_classes, cfg.ncm_feat)
    net = _with_head(src, {"name": "ncm", "feat_type": cfg.ncm_feat, "dist_type": cfg.ncm_dist})
    net.head.centroids.copy_(torch.as_tensor(centroids))
    net.head.featmean.copy_(torch.as_tensor(featmean))
    return _feature_outputs(net, feats, ctx, out_dir, {"feat_type": cfg.ncm_feat, "dist_type": cfg.ncm_dist})


def _trained_head(cfg: RebalanceConfig, src: Network) -> Network:
    if cfg.method == "crt":
        return _with_head(src, {"name": "linear"})  # re-initialised (PyTorch default init), with bias
    if cfg.method == "lws":
        net = _with_head(src, {"name": "lws", "base": dict(src.spec["head"])})
        net.head.fc.load_state_dict(src.head.state_dict())
        return net
    net = _with_head(src, {"name": "tau_norm", "tau": 1.0, "learnable": True})  # learned τ, Kang et al. B.5
    net.head.weight.copy_(class_weight(src.head).detach())
    return net


def rebalance(cfg: RebalanceConfig, ctx: BuildContext, out_dir: Path, checkpoint_dir: Path,
              tracker: Any = None, timings_path: Path | None = None) -> dict:
    """Rebalance ``cfg.model`` with ``cfg.method``; write ``out_dir`` atomically; return its metrics.

    ``timings_path``: where a trained head's wall times go (``pipeline.tracking.write_timings``).
    """
    src_dir = model_dir(ctx, cfg.model)
    src = load_network(src_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)  # a declared out, also for the methods that train nothing
    if cfg.method == "ncm":
        return _ncm(cfg, src, load_features(src_dir), ctx, out_dir)
    if cfg.method == "tau_norm" and cfg.tau_select != "learn":
        return _tau_posthoc(cfg, src, load_features(src_dir), ctx, out_dir)
    seed_everything(cfg.train.seed)
    method = Decoupled(_trained_head(cfg, src), update_bn=cfg.update_bn)
    trainer, device = fit_method(method, cfg.train, ctx, checkpoint_dir, tracker,
                                 extra_hash={"model": cfg.model, "method": cfg.method, "update_bn": cfg.update_bn,
                                             "source": hashlib.sha256((src_dir / "model.pt").read_bytes()).hexdigest()})
    extra = {"tau": float(method.network.head.tau.detach())} if cfg.method == "tau_norm" else {}
    return write_outputs(method, trainer, ctx, out_dir, device, tracker, extra, timings_path=timings_path)
