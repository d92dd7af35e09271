"""RAC's retrieval step: k nearest memory entries of each query, their class texts, and memory edits.

RAC (Long et al., CVPR 2022, Sec. 3.2-3.4 and 4.7; METHODS.md §8): a frozen encoder E embeds the query; the k = 30
nearest keys of the memory (faiss HNSW, M = 32, cosine) give k class texts, concatenated in rank order into one string
for the text encoder. During training the query itself is in the memory and must not be its own neighbour. No official
code exists; the choices here:

* Self-exclusion is **by sample id, never by rank**: every memory entry whose id equals the query's id is dropped (an
  id stored twice is dropped twice), and enough extra hits are searched (k + the largest number of entries any query
  id has) that k remain. A duplicate image stored under *another* id is a legitimate neighbour and is kept.
* k larger than the memory (minus the entries a query id excludes) is an error, never a silently shorter list.
* The texts of a query's neighbours are joined with one space, nearest first; the text encoder truncates the result.
* :func:`edit_memory` implements "dynamically add or remove datasets from I" (Sec. 4.7) without retraining: it
  reconstructs the stored keys from the faiss index (``reconstruct_n``; flat and HNSW-flat indexes store them), keeps
  those not removed, appends the new ones and builds a fresh index of the same kind and metric, with the same HNSW
  parameters (M, read as ``hnsw.nb_neighbors(1)``; efConstruction; efSearch). The original memory is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np

from pipeline.index.memory import RetrievalMemory

logger = logging.getLogger(__name__)


class Retriever:
    """k-NN lookup of class labels and texts in a :class:`~pipeline.index.memory.RetrievalMemory`.

    Args:
        memory: the searchable memory (its ``texts`` are indexed by label).
        k: neighbours per query (RAC: 30).
    """

    def __init__(self, memory: RetrievalMemory, k: int = 30) -> None:
        if k < 1 or k > len(memory):
            raise ValueError(f"k={k} must be in [1, memory size {len(memory)}]")
        self.memory, self.k = memory, int(k)
        # sorted distinct ids and how often each is stored, for the per-query exclusion count
        self._uids, self._ucounts = np.unique(np.asarray(memory.ids, dtype=np.int64), return_counts=True)

    def __len__(self) -> int:
        return len(self.memory)

    def _stored_count(self, query_ids: np.ndarray) -> np.ndarray:
        """(B,) how many memory entries carry each query's id."""
        pos = np.clip(np.searchsorted(self._uids, query_ids), 0, max(len(self._uids) - 1, 0))
        return np.where(self._uids[pos] == query_ids, self._ucounts[pos], 0)

    def neighbours(self, features: np.ndarray, query_ids: np.ndarray | None = None) -> np.ndarray:
        """Labels of the k nearest memory entries of each query, nearest first.

        Args:
            features: (B, D) query embeddings from the memory's encoder.
            query_ids: (B,) sample id of each query; every memory entry with that id is excluded (training queries).

        Returns:
            (B, k) int64 labels.

        Raises:
            ValueError: k exceeds the memory size minus the entries excluded for some query.
        """
        feats = np.asarray(features, dtype=np.float32)  # (B, D)
        size = len(self.memory)
        extra, qids = 0, None
        if query_ids is not None:
            qids = np.asarray(query_ids, dtype=np.int64).reshape(-1)  # (B,)
            if qids.shape[0] != feats.shape[0]:
                raise ValueError(f"query_ids has {qids.shape[0]} entries for {feats.shape[0]} queries")
            extra = int(self._stored_count(qids).max()) if len(qids) else 0
        if self.k + extra > size:
            why = f" minus the {extra} entries stored under a query's id" if extra else ""
            raise ValueError(f"k={self.k} exceeds the memory size {size}{why}; use k <= {size - extra}")
        _, ids, labels = self.memory.search(feats, self.k + extra)  # (B, k + extra), -1 where nothing was found
        drop = ids < 0
        if qids is not None:
            drop |= ids == qids[:, None]
        order = np.argsort(drop, axis=1, kind="stable")[:, : self.k]  # kept hits first, rank order preserved
        if np.take_along_axis(drop, order, axis=1).any():
            raise RuntimeError(f"the index returned fewer than k={self.k} valid neighbours; raise ef_search")
        return np.take_along_axis(labels, order, axis=1)  # (B, k)

    def texts(self, labels: np.ndarray) -> list[str]:
        """One string per query: its neighbours' class texts (``memory.texts[label]``) joined by " ", nearest first.

        Args:
            labels: (B, k) neighbour labels from :meth:`neighbours`.
        """
        texts = self.memory.texts
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= len(texts)):
            raise ValueError(
                f"neighbour labels span [{labels.min()}, {labels.max()}] but the memory has "
                f"{len(texts)} class texts; build the memory with one text per label"
            )
        return [" ".join(texts[int(label)] for label in row) for row in labels]


def _hnsw_params(index: faiss.Index) -> dict[str, int]:
    hnsw = faiss.downcast_index(index).hnsw
    return {
        "M": int(hnsw.nb_neighbors(1)),
        "ef_construction": int(hnsw.efConstruction),
        "ef_search": int(hnsw.efSearch),
    }


def _stored_vectors(index: faiss.Index) -> np.ndarray:
    """(N, D) float32 keys as stored (normalised for cosine), read back from a flat or HNSW-flat index."""
    on_gpu = "Gpu" in type(faiss.downcast_index(index)).__name__
    cpu = faiss.index_gpu_to_cpu(index) if on_gpu else index
    return cpu.reconstruct_n(0, cpu.ntotal)


def edit_memory(
    memory: RetrievalMemory,
    *,
    add_vectors: np.ndarray | None = None,
    add_ids: np.ndarray | None = None,
    add_labels: np.ndarray | None = None,
    remove_classes: Sequence[int] = (),
    remove_ids: Sequence[int] = (),
    texts: Sequence[str] | None = None,
) -> RetrievalMemory:
    """A new memory with entries removed and/or added (RAC Sec. 4.7); ``memory`` itself is unchanged.

    Args:
        memory: the memory to start from.
        add_vectors: (M, D) new keys from the same encoder (with ``add_ids`` and ``add_labels``, (M,) each).
        add_ids: (M,) sample ids of the new entries.
        add_labels: (M,) labels of the new entries (indices into the texts).
        remove_classes: labels whose entries are dropped.
        remove_ids: sample ids whose entries are dropped (every entry with that id).
        texts: class texts of the new memory; default: those of ``memory`` (labels must index into them).

    Returns:
        A :class:`RetrievalMemory` of the same kind and metric (and HNSW parameters).
    """
    adds = (add_vectors, add_ids, add_labels)
    if any(a is not None for a in adds) and any(a is None for a in adds):
        raise ValueError("edit_memory: add_vectors, add_ids and add_labels go together; pass all three or none")
    keep = ~np.isin(memory.labels, np.asarray(remove_classes, dtype=np.int64))
    keep &= ~np.isin(memory.ids, np.asarray(remove_ids, dtype=np.int64))
    for name, values, stored in (("classes", remove_classes, memory.labels), ("ids", remove_ids, memory.ids)):
        missing = sorted(set(int(v) for v in values) - set(stored.tolist()))
        if missing:
            logger.warning("edit_memory: %s %s are not in the memory; nothing removed for them", name, missing)
    vectors = _stored_vectors(memory.index)[keep]  # (N', D)
    ids, labels = memory.ids[keep], memory.labels[keep]
    if add_vectors is not None:
        new = np.asarray(add_vectors, dtype=np.float32)
        new_ids = np.asarray(add_ids, dtype=np.int64).reshape(-1)
        new_labels = np.asarray(add_labels, dtype=np.int64).reshape(-1)
        if new.ndim != 2 or new.shape[1] != vectors.shape[1] or not len(new) == len(new_ids) == len(new_labels):
            raise ValueError(
                f"edit_memory: add_vectors {new.shape} must be (M, {vectors.shape[1]}) with M ids and "
                f"M labels; got {len(new_ids)} ids and {len(new_labels)} labels"
            )
        vectors = np.concatenate([vectors, new])
        ids, labels = np.concatenate([ids, new_ids]), np.concatenate([labels, new_labels])
    if len(ids) == 0:
        raise ValueError("edit_memory: the edit leaves the memory empty; keep or add at least one entry")
    texts = list(memory.texts if texts is None else texts)
    if texts and (labels.min() < 0 or labels.max() >= len(texts)):
        raise ValueError(
            f"edit_memory: labels span [{labels.min()}, {labels.max()}] but there are {len(texts)} "
            f"class texts; pass texts= with one text per label"
        )
    kwargs: dict = {"use_gpu": "Gpu" in type(faiss.downcast_index(memory.index)).__name__}
    if memory.kind == "hnsw":
        kwargs.update(_hnsw_params(memory.index))
    return RetrievalMemory.build(vectors, ids, labels, texts, kind=memory.kind, metric=memory.metric, **kwargs)
