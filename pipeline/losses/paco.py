"""Parametric contrastive (PaCo) loss.

Reference: Cui et al., "Parametric Contrastive Learning", ICCV 2021, Eq. (9)-(11); official
dvlab-research/Parametric-Contrastive-Learning ``PaCo/LT/losses.py: PaCoLoss`` (METHODS.md §4.2).

For each of the B anchors (the query features), one softmax is taken over the C class centres (the rows of the
linear classifier, i.e. ``logits`` plus the log prior) and all 2B+K contrast features except the anchor itself.
The positives are the true-class centre (weight β) and every same-label contrast feature (weight α), including
the anchor's own key; the loss is the weighted mean of their log-probabilities with normaliser β + α·|P_i|.
The temperature T divides only the contrastive columns. There is no separate CE term.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.ce import _as_counts

logger = logging.getLogger(__name__)

_PRIOR_EPS = 1e-9  # official: log(prior + 1e-9)
_DENOM_EPS = 1e-12  # official: log(sum exp + 1e-12)


class PaCoLoss(nn.Module):
    """PaCo loss.

    Args:
        class_counts: Training samples per class (C,); gives the prior π = n/Σn.
        alpha: Weight α of each contrastive positive (0.01 CIFAR-100-LT scripts, 0.05 ImageNet-LT/iNat/Places).
        temperature: Contrastive temperature T (= moco_t: 0.05 CIFAR, 0.2 ImageNet-LT R50).
        beta: Weight β of the class-centre positive.
        gamma: Weight γ of the contrastive columns in the denominator.
        base_temperature: Loss scale is T / base_T; defaults to T (scale 1), as in the official scripts.
        supt: Temperature of the centre logits (1 in the official code).
    """

    log_prior: Tensor

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        alpha: float,
        temperature: float,
        beta: float = 1.0,
        gamma: float = 1.0,
        base_temperature: float | None = None,
        supt: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0 or supt <= 0:
            raise ValueError(f"temperature and supt must be > 0, got temperature={temperature}, supt={supt}")
        counts = torch.as_tensor(_as_counts(class_counts), dtype=torch.float64)
        prior = counts / counts.sum()
        self.num_classes = int(counts.numel())
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.base_temperature = float(temperature if base_temperature is None else base_temperature)
        self.supt = float(supt)
        self.register_buffer(
            "log_prior", torch.log(prior + _PRIOR_EPS).to(torch.get_default_dtype()), persistent=False
        )  # (C,)

    def forward(self, features: Tensor, labels: Tensor, logits: Tensor) -> Tensor:
        """Computes the PaCo loss (METHODS.md §4.2, steps 1-11).

        Args:
            features: (2B+K, dim) L2-normalised features: queries q, keys k, then the K queue entries.
            labels: (2B+K,) labels of ``features`` (queue labels included).
            logits: (B, C) classifier ("centre") logits of the queries.

        Returns:
            The scalar loss (mean over the B anchors).
        """
        batch = logits.shape[0]
        total = features.shape[0]
        if total < 2 * batch or labels.shape[0] != total:
            raise ValueError(
                f"expected features (2B+K, dim) and labels (2B+K,) with B={batch} from logits; "
                f"got features {tuple(features.shape)}, labels {tuple(labels.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes but class_counts has {self.num_classes}")
        labels = labels.reshape(-1, 1)  # (2B+K, 1)
        # Step 2: same-label mask of the anchors against every contrast feature.
        mask = torch.eq(labels[:batch], labels.T).to(features.dtype)  # (B, 2B+K)
        # Step 3: contrastive similarities, divided by T.
        con = features[:batch] @ features.T / self.temperature  # (B, 2B+K)
        # Step 4: centre logits with the log prior, divided by supt only (not by T).
        sup = (logits + self.log_prior.to(logits.dtype)) / self.supt  # (B, C)
        # Step 5: one row of logits, stabilised by its (detached) max.
        all_logits = torch.cat((sup, con.to(sup.dtype)), dim=1)  # (B, C+2B+K)
        all_logits = all_logits - all_logits.max(dim=1, keepdim=True).values.detach()
        # Step 6: drop the anchor's own column i (its own q); its key at column B+i stays a positive.
        self_mask = torch.ones_like(mask)
        self_mask[torch.arange(batch, device=mask.device), torch.arange(batch, device=mask.device)] = 0.0
        mask = mask * self_mask
        # Step 7: positive weights: β on the true centre, α on every same-label contrast feature.
        onehot = F.one_hot(labels[:batch].reshape(-1), num_classes=self.num_classes).to(mask.dtype)  # (B, C)
        pos = torch.cat((onehot * self.beta, mask * self.alpha), dim=1).to(all_logits.dtype)  # (B, C+2B+K)
        # Step 8: denominator: every centre plus every contrast column except self (weighted by γ).
        denom_mask = torch.cat((torch.ones_like(onehot), self.gamma * self_mask), dim=1).to(all_logits.dtype)
        # Step 9: log-probabilities under the shared softmax.
        log_prob = all_logits - torch.log((torch.exp(all_logits) * denom_mask).sum(1, keepdim=True) + _DENOM_EPS)
        # Steps 10-11: weighted mean over positives (normaliser β + α|P_i|), then mean over anchors.
        mean_log_prob_pos = (pos * log_prob).sum(1) / pos.sum(1)  # (B,)
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.mean()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, supt={self.supt}"
        )
