"""Parametric Contrastive Learning (Cui et al., ICCV 2021): a MoCo-style momentum encoder and queue, PaCo loss.

Follows dvlab-research/Parametric-Contrastive-Learning ``PaCo/LT/moco/builder.py: MoCo`` (METHODS.md §4.1) and
``PaCo/LT/losses.py: PaCoLoss`` (§4.2, Eq. 9-11 of the paper; :class:`pipeline.losses.PaCoLoss`).

Query side (trained, exported): ``network`` = backbone → pooled feature f (B, d) → ``linear`` head (the learnable
class centres, ``nn.Linear(d, C)`` with bias). The contrastive branch is the MLP projection
``Linear(d, d) → BatchNorm1d(d) → ReLU → Linear(d, dim)`` on the same f (``mlp=True``), ``q = normalize(proj(f))``.
Key side (not trained): a deep copy of backbone + projection, updated by ``θ_k ← m θ_k + (1 − m) θ_q``.

Per optimizer update (the :class:`pipeline.train.method.Method` hooks, so that SAM's two passes stay correct):

* ``prepare_batch``: k = normalize(key_proj(key_backbone(view 1))) with the current key encoder, without gradients;
* ``training_step`` (pure): features = cat(q, k, queue) (2B+K, dim), targets = cat(y, y, queue_l),
  loss = PaCoLoss(features, targets, linear(f));
* ``on_after_update``: the momentum update of the key encoder, then the enqueue of this batch's keys and labels.

Equivalence with the official order. The official forward runs the momentum update *before* computing the keys of
the same step; here it runs after the optimizer step of the previous update. With θ_q^t the query weights used at
update t, the key weights at update t are, officially, EMA(θ_k0; θ_q^0, ..., θ_q^t) and here EMA(θ_k0; θ_q^1, ...,
θ_q^t). They differ only by the official first EMA with θ_q^0 applied to θ_k0 = θ_q^0, i.e. ``m x + (1 − m) x = x``,
a no-op up to float rounding (≈1 ulp). The loss at update t uses the queue before this batch is written, as in the
official code (the queue is cloned into ``features`` before ``_dequeue_and_enqueue``). One extra EMA runs after the
last update; the key encoder is not used at inference, so it changes nothing that is exported.

Departures from the official code (all without effect on the trained query network):

* under torchrun (``pipeline.train.distributed``) the key images are shuffled across ranks before the key encoder
  and the keys unshuffled after it (MoCo's ``_batch_shuffle_ddp``, the guard against BN statistics leaking across
  the query/key pair), and the queue receives the keys and labels of every rank (``concat_all_gather``), as
  officially; ``batch_size`` is then the per-rank batch and ``queue_size`` must be a multiple of the global batch.
  In one process both are the identity: no shuffle, the local batch is enqueued (the official code only supports
  DDP, issue #27);
* ``linear_k``, the official momentum copy of the classifier, is never used there and is omitted here;
* the MLP's two Linear layers use PyTorch's default init (the official last Linear is the encoder's ``fc``, whose
  init depends on the backbone definition).

As in MoCo, the key encoder is a submodule that follows ``train()``/``eval()``: in training its BatchNorm layers
use the key batch's statistics and update their own running statistics (in ``prepare_batch``, once per update).
The EMA covers parameters only; BN buffers of the key encoder are its own running statistics, as officially.
The initial queue is ``normalize(randn(K, dim), dim=0)``: columns, not rows, are unit vectors (official quirk),
and its random labels count as positives until overwritten (§4.2).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses import PaCoLoss
from pipeline.models.network import Network
from pipeline.train import distributed
from pipeline.train.method import Method, StepOutput

logger = logging.getLogger(__name__)


def _projection(in_dim: int, dim: int) -> nn.Sequential:
    """MoCo v2 / PaCo ``mlp=True`` head: Linear(d, d) → BN1d(d) → ReLU → Linear(d, dim)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(), nn.Linear(in_dim, dim))


class PaCo(Method):
    """PaCo training: query network + MLP projection, momentum key encoder, a queue of K keys and labels.

    Args:
        network: the query network used at inference: backbone → pooled feature → ``linear`` head (C outputs).
            It must have no neck; its ``normalize_features`` flag is the official ``normalize`` option (False).
        class_counts: training samples per class (C,), for the log-prior of :class:`PaCoLoss`.
        batch_size: the per-update batch size B; ``queue_size`` must be a multiple of it (loader ``drop_last``).
        dim: projection (contrastive feature) dimension, ``moco_dim`` (32 CIFAR, 128 ImageNet-LT).
        queue_size: number K of queued keys, ``moco_k`` (1024 CIFAR, 8192 ImageNet-LT).
        momentum: key encoder momentum m (0.999).
        temperature: contrastive temperature T, ``moco_t`` (0.05 CIFAR, 0.2 ImageNet-LT R50).
        alpha: weight of each contrastive positive (0.01 CIFAR scripts, 0.05 ImageNet-LT/iNat/Places).
        beta: weight of the class-centre positive (1.0).
        gamma: weight of the contrastive columns in the denominator (1.0).

    Raises:
        ValueError: on a network with a neck, a class count mismatch, or ``queue_size % batch_size != 0``.
    """

    queue: Tensor
    queue_l: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        network: Network,
        class_counts: Sequence[int] | Tensor,
        *,
        batch_size: int,
        dim: int = 32,
        queue_size: int = 1024,
        momentum: float = 0.999,
        temperature: float = 0.05,
        alpha: float = 0.01,
        beta: float = 1.0,
        gamma: float = 1.0,
    ) -> None:
        super().__init__()
        if network.neck is not None:
            raise ValueError("PaCo's query network must have no neck (spec 'neck': null): the projection and the "
                             "linear centres both read the pooled backbone feature")
        num_classes = len(class_counts)
        if network.spec["num_classes"] != num_classes:
            raise ValueError(f"network has {network.spec['num_classes']} classes but class_counts has {num_classes}")
        if batch_size <= 0 or queue_size <= 0 or queue_size % batch_size != 0:
            raise ValueError(f"PaCo queue_size={queue_size} must be a positive multiple of batch_size={batch_size} "
                             "(the official code asserts K % B == 0): change the batch size or queue size, and load "
                             "with drop_last=True")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"PaCo momentum must be in [0, 1], got {momentum}")
        self.network = network
        self.batch_size, self.queue_size, self.momentum = int(batch_size), int(queue_size), float(momentum)
        feat_dim = network.backbone.num_features  # d: 64 for the CIFAR ResNets, 2048 for ResNet-50
        self.projection = _projection(feat_dim, dim)
        # Key encoder: an exact copy at start (official: param_k.copy_(param_q)), never trained.
        self.key_backbone = copy.deepcopy(network.backbone)
        self.key_projection = copy.deepcopy(self.projection)
        for p in (*self.key_backbone.parameters(), *self.key_projection.parameters()):
            p.requires_grad_(False)
        self.loss = PaCoLoss(class_counts, alpha=alpha, temperature=temperature, beta=beta, gamma=gamma)
        # Queue (official): randn normalised along dim 0 (columns), random labels, pointer 0.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=0))  # (K, dim)
        self.register_buffer("queue_l", torch.randint(0, num_classes, (queue_size,)))  # (K,)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Keys and labels of the current update, written to the queue in on_after_update (not saved: a checkpoint
        # is taken between updates, when nothing is pending).
        self._pending: tuple[Tensor, Tensor] | None = None

    # --- parameters ---------------------------------------------------------------------------------------------
    def _query_params(self) -> list[Tensor]:
        return [*self.network.backbone.parameters(), *self.projection.parameters()]

    def _key_params(self) -> list[Tensor]:
        return [*self.key_backbone.parameters(), *self.key_projection.parameters()]

    def param_groups(self) -> list[dict]:
        params = [*self.network.parameters(), *self.projection.parameters()]
        return [{"params": [p for p in params if p.requires_grad]}]

    # --- the per-update hooks -----------------------------------------------------------------------------------
    def _pooled(self, images: Tensor) -> Tensor:
        """Pooled query feature f (B, d): PaCo's hook feature (``feat_after_avg_q``), before any normalisation."""
        return self.network.backbone(images)

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        images, labels = batch["images"], batch["labels"]
        if len(images) < 2:
            raise ValueError(f"PaCo needs two views per image (query, key), got {len(images)}: use a two-view "
                             "transform (the paco presets' q/k augmentations)")
        if labels.shape[0] != self.batch_size:
            raise ValueError(f"PaCo got a batch of {labels.shape[0]} but was built for batch_size={self.batch_size} "
                             f"(queue_size={self.queue_size} must stay a multiple): load with drop_last=True")
        key_images, idx_unshuffle = distributed.batch_shuffle(images[1])  # identity in one process
        keys = F.normalize(self.key_projection(self.key_backbone(key_images)).float(), dim=1)  # (B, dim)
        keys = distributed.batch_unshuffle(keys, idx_unshuffle)
        self._pending = (keys, labels)
        return {**batch, "keys": keys}

    def training_step(self, batch: dict) -> StepOutput:
        labels = batch["labels"]  # (B,)
        f = self._pooled(batch["images"][0])  # (B, d)
        q = F.normalize(self.projection(f).float(), dim=1)  # (B, dim)
        hook = F.normalize(f, dim=1) if self.network.normalize_features else f  # official ``normalize`` option
        logits = self.network.forward_head(hook)  # (B, C): the linear centres
        # The queue is read (cloned), never written here: SAM runs this twice per update.
        features = torch.cat((q, batch["keys"].to(q.dtype), self.queue.clone().detach().to(q.dtype)))  # (2B+K, dim)
        targets = torch.cat((labels, labels, self.queue_l.clone()))  # (2B+K,)
        loss = self.loss(features, targets, logits.float())
        return StepOutput(loss=loss, parts={"paco": loss.detach()}, logits=logits)

    @torch.no_grad()
    def on_after_update(self, step: int) -> None:
        if self._pending is None:
            raise RuntimeError(f"PaCo.on_after_update(step={step}) without a prepared batch: call prepare_batch "
                               "once before each update (the Trainer does)")
        # θ_k ← m θ_k + (1 − m) θ_q over parameters (official _momentum_update_key_encoder), foreach for speed.
        k_params, q_params = self._key_params(), self._query_params()
        torch._foreach_mul_(k_params, self.momentum)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - self.momentum)
        # Enqueue (official _dequeue_and_enqueue): overwrite [ptr, ptr + B), ptr = (ptr + B) % K.
        keys, labels = self._pending
        self._pending = None
        keys, labels = distributed.concat_all_gather(keys), distributed.concat_all_gather(labels)  # (W·B, dim), (W·B,)
        ptr, b = int(self.queue_ptr), keys.shape[0]
        if self.queue_size % b:
            raise ValueError(f"PaCo queue_size={self.queue_size} must be a multiple of the global batch {b} (batch "
                             "size x nproc): change queue_size or the batch size")
        self.queue[ptr:ptr + b] = keys.to(self.queue.dtype)
        self.queue_l[ptr:ptr + b] = labels.to(self.queue_l.dtype)
        self.queue_ptr[0] = (ptr + b) % self.queue_size

    # --- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Raw linear logits (§4.1 inference): no log-prior, the contrastive branch unused."""
        return {"main": self.network(images)}

    def export(self) -> Network:
        return self.network

    @torch.no_grad()
    def predict_and_embed(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.network.forward_heads_and_features(images)  # one backbone pass for logits and features
