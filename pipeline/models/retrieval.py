"""RAC's retrieval branch and logit fusion (Long et al., "Retrieval Augmented Classification for Long-Tail Visual
Recognition", CVPR 2022, Sec. 3.3-3.4, Eq. 5; METHODS.md §8).

The retrieval branch encodes the joined texts of a query's k neighbours with a text encoder T (one call per batch)
and maps them with a linear layer to ``f_ret`` (B, L). Fusion (Eq. 5) adds the two branches' L2-normalised logits and
rescales by L/2, L = the number of classes, so that the fused logits have the magnitude of a Xavier-initialised L-way
layer. This module receives the text encoder as an object: it never imports faiss or open_clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-12  # F.normalize's default: a zero row stays zero instead of becoming NaN


def fuse_logits(f_base: Tensor, f_ret: Tensor) -> Tensor:
    """RAC Eq. 5: ``(L/2) · (f_ret/‖f_ret‖₂ + f_base/‖f_base‖₂)`` row-wise.

    Args:
        f_base: (B, L) base-branch logits.
        f_ret: (B, L) retrieval-branch logits.

    Returns:
        (B, L) fused logits.
    """
    if f_base.shape != f_ret.shape or f_base.ndim != 2:
        raise ValueError(
            f"fuse_logits needs two (B, L) tensors of one shape; got {tuple(f_base.shape)} and {tuple(f_ret.shape)}"
        )
    num_classes = f_base.shape[1]
    return (num_classes / 2) * (F.normalize(f_ret, dim=1, eps=_EPS) + F.normalize(f_base, dim=1, eps=_EPS))


class RetrievalBranch(nn.Module):
    """Texts of the retrieved neighbours → text encoder T (once per batch) → Linear(T.dim, L) → ``f_ret``.

    Args:
        text_encoder: an ``nn.Module`` with ``forward(texts) -> (B, D)`` and ``dim`` (``pipeline.index.text``).
        num_classes: L.
    """

    def __init__(self, text_encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.fc = nn.Linear(int(text_encoder.dim), num_classes)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Args: texts, B joined neighbour strings. Returns (B, L) logits."""
        feats = self.text_encoder(list(texts))  # (B, D): one call for the whole batch
        return self.fc(feats.to(self.fc.weight.dtype))  # (B, L)
