"""Evaluation: shot-group metrics, post-hoc rebalancing on features (τ-norm, NCM), plots.

``plots`` is not imported here so that importing metrics never pulls in matplotlib.
"""

from pipeline.evaluate.metrics import mean_std, per_class_accuracy, shot_accuracy, shot_groups
from pipeline.evaluate.posthoc import choose_tau, ncm_centroids, ncm_logits, tau_sweep

__all__ = [
    "choose_tau",
    "mean_std",
    "ncm_centroids",
    "ncm_logits",
    "per_class_accuracy",
    "shot_accuracy",
    "shot_groups",
    "tau_sweep",
]
