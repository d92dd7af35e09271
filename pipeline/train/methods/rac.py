"""Retrieval Augmented Classification (Long et al., "Retrieval Augmented Classification for Long-Tail Visual
Recognition", CVPR 2022; no official code, METHODS.md §8).

Two branches trained jointly under one loss:

    f_base = B(x)                                   base network: backbone + linear head, (B, L)
    z = E(x); texts = join(texts of the k nearest memory entries of z)   frozen encoder E + faiss memory
    f_ret = W · T(texts)                            retrieval branch: text encoder T + linear layer, (B, L)
    f = (L/2) · (f_ret/‖f_ret‖ + f_base/‖f_base‖)   Eq. 5, L = number of classes
    loss = LACE(f, y)                               Eq. 3: logit-adjusted CE, τ = 1, label smoothing 0.1

Choices of this implementation (the paper leaves them open):

* Retrieval happens in ``prepare_batch`` (no gradients, once per update), so SAM's two ``training_step`` passes see the
  same texts and the text encoder runs once per pass on the whole batch.
* Training texts are by default **precomputed once per run** (``train_texts``, :func:`precompute_texts`): the
  neighbours of each training row's test-transform embedding, self-excluded by sample id. The index is static during
  training (paper Sec. 3.2), and E is frozen, so this only differs from per-batch retrieval by ignoring augmentation.
  With ``train_texts=None`` the augmented view is embedded with E and searched each step, excluding ``train_ids``.
* The self-match is dropped by sample id (see ``pipeline.index.neighbours``); at prediction time nothing is excluded.
* E stays in eval mode with ``requires_grad=False`` and outside the optimizer; it stays in ``state_dict`` (frozen
  weights are restored identically on resume). The retriever (faiss memory) is not module state:
  :meth:`RAC.set_retriever` swaps the memory without touching any weight (Sec. 4.7).
* ``predict`` returns the three heads: ``fused`` (the model's prediction), ``base`` and ``retrieval`` (raw ``f_ret``).
  ``export`` returns the base network only (what ``model.pt`` holds; its ``forward_features`` serve ``features.npz``).
* The loss is computed in float32 on the fused logits; ``parts["ce"]`` is that loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.models.network import Network
from pipeline.models.retrieval import RetrievalBranch, fuse_logits
from pipeline.train.method import Method, StepOutput


class NeighbourTexts(Protocol):
    """What RAC needs of a retriever (``pipeline.index.neighbours.Retriever``)."""

    def neighbours(self, features: np.ndarray, query_ids: np.ndarray | None = None) -> np.ndarray: ...

    def texts(self, labels: np.ndarray) -> list[str]: ...


def precompute_texts(
    retriever: NeighbourTexts, features: np.ndarray, ids: np.ndarray, batch_size: int = 4096
) -> list[str]:
    """Joined neighbour texts of every training row, each query's own id excluded.

    Args:
        retriever: the training memory's retriever.
        features: (N, D) embeddings of the training set by the memory's encoder.
        ids: (N,) sample id of each row.
        batch_size: queries per search.

    Returns:
        N strings, indexed like ``features`` (i.e. by dataset row = ``batch["index"]``).
    """
    features, ids = np.asarray(features), np.asarray(ids).reshape(-1)
    if len(features) != len(ids):
        raise ValueError(f"precompute_texts: {len(features)} feature rows but {len(ids)} ids")
    texts: list[str] = []
    for start in range(0, len(ids), batch_size):
        stop = start + batch_size
        texts += retriever.texts(retriever.neighbours(features[start:stop], query_ids=ids[start:stop]))
    return texts


class RAC(Method):
    """Base network + retrieval branch, fused (Eq. 5) and trained with LACE.

    Args:
        network: the base branch (backbone + linear head → ``f_base``); what :meth:`export` returns.
        branch: the retrieval branch (text encoder + linear layer → ``f_ret``).
        encoder: frozen image encoder E, normalised images (B, 3, H, W) → (B, D) query embeddings of the memory's space.
        retriever: k-NN lookup of neighbour texts (``pipeline.index.neighbours.Retriever``).
        loss: ``LogitAdjustedLoss`` (RAC: τ = 1, label smoothing 0.1); ``forward(logits, target)``.
        train_texts: joined neighbour text of each training row (self-excluded), indexed by ``batch["index"]``;
            None = retrieve per batch from the augmented view.
        train_ids: (N,) sample id of each training row, for self-exclusion when ``train_texts`` is None.
    """

    head_names = ("fused", "base", "retrieval")

    def __init__(
        self,
        network: Network,
        branch: RetrievalBranch,
        encoder: nn.Module,
        retriever: NeighbourTexts,
        loss: nn.Module,
        train_texts: Sequence[str] | None = None,
        train_ids: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.network, self.branch, self.loss = network, branch, loss
        self.encoder = encoder.eval().requires_grad_(False)
        self.retriever = retriever
        self.train_texts = None if train_texts is None else list(train_texts)
        self.train_ids = None if train_ids is None else np.asarray(train_ids, dtype=np.int64).reshape(-1)

    def train(self, mode: bool = True) -> RAC:
        super().train(mode)
        self.encoder.eval()  # frozen E never switches to training mode (BN statistics, dropout)
        return self

    def param_groups(self) -> list[dict]:
        params = [p for m in (self.network, self.branch) for p in m.parameters() if p.requires_grad]
        return [{"params": params}]

    def set_retriever(self, retriever: NeighbourTexts, train_texts: Sequence[str] | None = None) -> None:
        """Use another memory from now on (Sec. 4.7); no weight changes.

        Args:
            retriever: the new retriever.
            train_texts: new precomputed training texts; None keeps the current ones (they belong to the old memory).
        """
        self.retriever = retriever
        if train_texts is not None:
            self.train_texts = list(train_texts)

    @torch.no_grad()
    def _retrieve(self, images: Tensor, query_ids: np.ndarray | None) -> list[str]:
        z = self.encoder(images).float().cpu().numpy()  # (B, D)
        return self.retriever.texts(self.retriever.neighbours(z, query_ids=query_ids))

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        rows = batch["index"].cpu().numpy()  # (B,) dataset row indices
        if self.train_texts is not None:
            texts = [self.train_texts[int(i)] for i in rows]
        elif self.train_ids is not None:
            texts = self._retrieve(batch["images"][0], self.train_ids[rows])
        else:
            raise ValueError(
                "RAC training needs train_texts (precomputed, self-excluded) or train_ids "
                "(to exclude each query's own entry); got neither"
            )
        return {**batch, "texts": texts}

    def training_step(self, batch: dict) -> StepOutput:
        f_base = self.network(batch["images"][0])  # (B, L)
        f_ret = self.branch(batch["texts"])  # (B, L): one text-encoder call
        fused = fuse_logits(f_base.float(), f_ret.float())  # (B, L)
        loss = self.loss(fused, batch["labels"])
        return StepOutput(loss=loss, parts={"ce": loss.detach()}, logits=fused)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        f_base = self.network(images)  # (B, L)
        f_ret = self.branch(self._retrieve(images, None))  # (B, L), nothing excluded at test time
        return {"fused": fuse_logits(f_base.float(), f_ret.float()), "base": f_base, "retrieval": f_ret}

    def export(self) -> Network:
        return self.network

    def extra_outputs(self) -> dict[str, dict[str, Tensor]]:
        """The retrieval branch (text encoder + linear layer): with ``model.pt`` the whole trained RAC."""
        return {"branch.pt": {k: v.detach().cpu() for k, v in self.branch.state_dict().items()}}
