"""Retrieval memory: a faiss index over encoded training images, with ids, labels and texts.

RAC (Long et al., "Retrieval Augmented Classification for Long-Tail Visual Recognition", CVPR 2022; no official code,
METHODS.md §8): keys are embeddings of the memory images from a frozen encoder, searched with an approximate k-NN
index (faiss HNSW, M = 32, k = 30, cosine similarity); during training the query's own entry is dropped **by sample id**
(not blindly the first rank, which breaks with duplicates). The retrieval-only baseline (RAC Table 4) labels each query
with its nearest memory image's label; :func:`knn_predict` also gives the majority of k.

faiss facts (ECOSYSTEM.md §8): cosine = ``normalize_L2`` on database and queries + inner product; ``efConstruction``
must be set before ``add``; HNSW has no ``add_with_ids`` (wrap in ``IndexIDMap2``) and is not implemented on GPU, so
only exact indexes go to the GPU, and only with a faiss-gpu build (``StandardGpuResources``).

Distances returned by :func:`search`: squared L2 distances (ascending) for ``l2``; inner products / cosine similarities
(descending) for ``ip`` / ``cosine``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from pipeline.evaluate.metrics import shot_accuracy
from pipeline.io import atomic_dir

logger = logging.getLogger(__name__)

KINDS = ("exact", "hnsw")
METRICS = ("l2", "ip", "cosine")
INDEX_FILE = "index.faiss"
ARRAYS_FILE = "memory.npz"
TEXTS_FILE = "texts.json"
META_FILE = "memory.json"


def _check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32 C-contiguous copy; L2-normalised rows for cosine (faiss.normalize_L2 works in place)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, D); got shape {x.shape}")
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(
    vectors: np.ndarray,
    *,
    kind: str = "hnsw",
    metric: str = "cosine",
    M: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    use_gpu: bool | None = None,
    ids: np.ndarray | None = None,
) -> faiss.Index:
    """Build a faiss index over ``vectors``.

    Args:
        vectors: database (N, D), converted to float32.
        kind: ``"exact"`` (flat) or ``"hnsw"`` (approximate, CPU only).
        metric: ``"l2"``, ``"ip"`` (inner product) or ``"cosine"`` (normalize_L2 + inner product).
        M: HNSW graph degree (RAC: 32).
        ef_construction: HNSW build beam width (faiss default 40), set before ``add``.
        ef_search: HNSW search beam width (faiss default 16).
        use_gpu: None = on a GPU when possible; an exact index moves to the GPU only with a faiss-gpu build and a GPU.
        ids: optional int64 ids (N,) stored in the index (``IndexIDMap2``); without them it returns row positions.

    Returns:
        The faiss index, already filled.
    """
    _check_choice(kind, "index kind", KINDS)
    _check_choice(metric, "metric", METRICS)
    x = _prepare(vectors, metric)  # (N, D)
    n, d = x.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, M, faiss_metric)
        index.hnsw.efConstruction = ef_construction  # must precede add()
        index.hnsw.efSearch = ef_search
    else:
        index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    wants_gpu = use_gpu if use_gpu is not None else True
    on_gpu = wants_gpu and kind == "exact" and gpu_available()
    if use_gpu and not on_gpu:
        logger.warning(
            "GPU index requested but unavailable (kind=%s, faiss GPU build=%s); using the CPU",
            kind,
            hasattr(faiss, "StandardGpuResources"),
        )
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index.referenced_resources = resources  # keep the resources alive as long as the index
    if ids is not None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},); got {ids.shape}")
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(x, ids)
    else:
        index.add(x)
    logger.info("built %s %s index on %s: %d vectors of dim %d", kind, metric, "GPU" if on_gpu else "CPU", n, d)
    return index


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    metric: str,
    exclude_ids: np.ndarray | None = None,
    db_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each query, optionally without the query itself.

    Args:
        index: from :func:`build_index`.
        queries: (Q, D).
        k: neighbours per query; must not exceed the index size (nor size − 1 when excluding).
        metric: the metric the index was built with (cosine normalises the queries).
        exclude_ids: (Q,) the id of each query in the memory; that id is removed from its result. k + 1 neighbours are
            searched and the hit with the query's id is dropped wherever it ranks (duplicate vectors may outrank it);
            when it is not among them the last one is dropped.
        db_ids: (N,) sample id of each row position; None when the index returns ids itself (IndexIDMap2) or when row
            positions are the ids.

    Returns:
        ``(distances (Q, k), ids (Q, k))``, nearest first.
    """
    _check_choice(metric, "metric", METRICS)
    size = index.ntotal
    needed = k + (1 if exclude_ids is not None else 0)
    if k < 1 or needed > size:
        extra = " + 1 for the excluded query itself" if exclude_ids is not None else ""
        raise ValueError(f"k={k}{extra} exceeds the index size {size}; use k <= {size - (needed - k)}")
    q = _prepare(queries, metric)  # (Q, D)
    distances, found = index.search(q, needed)  # (Q, needed), -1 where faiss found nothing
    if db_ids is not None:
        db_ids = np.asarray(db_ids)
        found = np.where(found >= 0, db_ids[np.clip(found, 0, None)], -1)
    if exclude_ids is None:
        return distances, found
    exclude_ids = np.asarray(exclude_ids).reshape(-1)
    if exclude_ids.shape[0] != q.shape[0]:
        raise ValueError(f"exclude_ids has {exclude_ids.shape[0]} entries for {q.shape[0]} queries")
    drop = (found == exclude_ids[:, None]) | (found < 0)  # (Q, k+1)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept hits first, rank order preserved
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(found, order, axis=1)


def knn_votes(neighbour_labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Votes of the first k neighbours per class, plus a tie-break bonus in [0, 1) favouring the nearest class.

    ``argmax`` of the result is :func:`knn_predict`: integer part = number of votes; fractional part =
    (k − rank of the class's first neighbour) / (k + 1), so among tied classes the one seen first wins.

    Args:
        neighbour_labels: (Q, ≥k) labels of the neighbours, nearest first; negative labels (no neighbour) are ignored.
        k: how many neighbours vote.
        num_classes: C.

    Returns:
        (Q, C) float32 scores.
    """
    labels = np.asarray(neighbour_labels)[:, :k]  # (Q, k)
    q, kk = labels.shape
    votes = np.zeros((q, num_classes), dtype=np.float64)
    first = np.full((q, num_classes), kk, dtype=np.int64)  # rank of the first neighbour of each class
    for rank in range(kk - 1, -1, -1):  # backwards, so the earliest rank is written last
        col = labels[:, rank]
        valid = col >= 0
        rows = np.flatnonzero(valid)
        np.add.at(votes, (rows, col[valid]), 1.0)
        first[rows, col[valid]] = rank
    bonus = np.where(votes > 0, (kk - first) / (kk + 1), 0.0)
    return (votes + bonus).astype(np.float32)


def knn_predict(neighbour_labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Majority vote of the first k neighbours; ties go to the class whose first neighbour is nearest.

    Args:
        neighbour_labels: (Q, ≥k) labels, nearest first.
        k: how many neighbours vote (k = 1 is the nearest-neighbour classifier).
        num_classes: C.

    Returns:
        (Q,) predicted labels.
    """
    return knn_votes(neighbour_labels, k, num_classes).argmax(axis=1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the exact k nearest neighbours that the approximate search also returns in its top k."""
    approx = np.asarray(approx_ids)[:, :k]
    exact = np.asarray(exact_ids)[:, :k]
    if approx.shape != exact.shape:
        raise ValueError(f"approx_ids {approx.shape} and exact_ids {exact.shape} differ after taking the first k={k}")
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k) if hits else float("nan")


@dataclass
class RetrievalMemory:
    """A searchable memory: faiss index over row positions, and per-row sample ids and labels.

    Attributes:
        index: faiss index whose row positions are 0..N-1.
        ids: (N,) int64 sample id of each row.
        labels: (N,) int64 class label of each row.
        texts: text of each class, indexed by label (the class names; RAC attaches the text to each neighbour).
        metric: ``"l2"`` / ``"ip"`` / ``"cosine"``.
        kind: ``"exact"`` / ``"hnsw"``.
    """

    index: faiss.Index
    ids: np.ndarray
    labels: np.ndarray
    texts: list[str] = field(default_factory=list)
    metric: str = "cosine"
    kind: str = "hnsw"

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        labels: np.ndarray,
        texts: Sequence[str] = (),
        *,
        kind: str = "hnsw",
        metric: str = "cosine",
        **index_kwargs: object,
    ) -> RetrievalMemory:
        """Build the index over ``vectors`` (N, D) and keep ``ids`` and ``labels`` (N,)."""
        index = build_index(vectors, kind=kind, metric=metric, **index_kwargs)  # type: ignore[arg-type]
        return cls(
            index, np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), list(texts), metric, kind
        )

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k nearest memory entries: ``(distances (Q, k), ids (Q, k), labels (Q, k))``; see :func:`search`."""
        distances, rows = search(
            self.index,
            queries,
            k,
            metric=self.metric,
            exclude_ids=None if exclude_ids is None else self._rows_of(exclude_ids),
        )
        rows_safe = np.clip(rows, 0, None)
        ids = np.where(rows >= 0, self.ids[rows_safe], -1)
        labels = np.where(rows >= 0, self.labels[rows_safe], -1)
        return distances, ids, labels

    def _rows_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Row position of each sample id (−2, matching nothing, for ids not in the memory)."""
        lookup = {int(i): row for row, i in enumerate(self.ids)}
        return np.array([lookup.get(int(i), -2) for i in np.asarray(sample_ids).reshape(-1)], dtype=np.int64)

    def save(self, directory: str | os.PathLike, atomic: bool = True) -> Path:
        """Write ``index.faiss``, ``memory.npz`` (ids, labels), ``texts.json`` and ``memory.json`` into ``directory``.

        Args:
            directory: target directory.
            atomic: write into a temporary sibling and rename (False when the caller already writes into a temp dir).
        """
        if atomic:
            with atomic_dir(directory) as tmp:
                self.save(tmp, atomic=False)
            return Path(directory)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(faiss.downcast_index(index)).__name__:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(directory / INDEX_FILE))
        np.savez(directory / ARRAYS_FILE, ids=self.ids, labels=self.labels)
        (directory / TEXTS_FILE).write_text(json.dumps(list(self.texts), ensure_ascii=False, indent=1))
        (directory / META_FILE).write_text(json.dumps({"metric": self.metric, "kind": self.kind, "size": len(self)}))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RetrievalMemory:
        """Read a memory written by :meth:`save` (always onto the CPU)."""
        directory = Path(directory)
        missing = [f for f in (INDEX_FILE, ARRAYS_FILE, TEXTS_FILE, META_FILE) if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"retrieval memory {directory} lacks {missing}; build it with `python -m stages.index`"
            )
        index = faiss.read_index(str(directory / INDEX_FILE))
        arrays = np.load(directory / ARRAYS_FILE)
        meta = json.loads((directory / META_FILE).read_text())
        texts = json.loads((directory / TEXTS_FILE).read_text())
        return cls(index, arrays["ids"], arrays["labels"], texts, meta["metric"], meta["kind"])


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    valid = labels >= 0
    out[np.flatnonzero(valid), labels[valid]] = 1.0
    return out


def build_memory_stats(
    train: Mapping[str, np.ndarray],
    eval_splits: Mapping[str, Mapping[str, np.ndarray]],
    *,
    train_counts: Sequence[int] | np.ndarray,
    texts: Sequence[str] = (),
    kind: str = "hnsw",
    metric: str = "cosine",
    k: int = 30,
    M: int = 32,
    ef_construction: int = 200,
    ef_search: int = 128,
    many: int = 100,
    few: int = 20,
    use_gpu: bool | None = None,
) -> tuple[RetrievalMemory, dict, dict[str, np.ndarray]]:
    """Build the memory and measure it: recall@k against exact search, kNN accuracy, build and query time.

    Args:
        train: ``{"features" (N, D), "labels" (N,), "ids" (N,)}``, the memory content.
        eval_splits: split name (``val``, ``test``) → ``{"features", "labels"}``; empty splits are skipped.
        train_counts: training images per class (C,).
        texts: text per class (class names).
        kind, metric, M, ef_construction, ef_search, use_gpu: see :func:`build_index`.
        k: neighbours for recall@k and the majority vote.
        many, few: shot thresholds.

    Returns:
        ``(memory, stats, predictions)``: ``stats`` is JSON-ready, its wall times under ``stats["timings"]`` (the
        only run-specific part: keep it out of files other stages depend on); ``predictions`` holds, for each
        evaluation split, ``<split>/knn`` (N, C) vote scores (see :func:`knn_votes`), ``<split>/nn`` (N, C) one-hot
        nearest label and ``<split>_labels``, the layout of a teacher's ``predictions.npz``.
    """
    num_classes = len(train_counts)
    size = len(train["labels"])
    if k > size - 1:
        raise ValueError(f"k={k} exceeds the index size {size} minus the excluded query (use k <= {size - 1})")
    index_kwargs = dict(M=M, ef_construction=ef_construction, ef_search=ef_search, use_gpu=use_gpu)
    start = time.perf_counter()
    memory = RetrievalMemory.build(
        train["features"], train["ids"], train["labels"], texts, kind=kind, metric=metric, **index_kwargs
    )
    build_time = time.perf_counter() - start
    start = time.perf_counter()
    exact = RetrievalMemory.build(
        train["features"], train["ids"], train["labels"], texts, kind="exact", metric=metric, use_gpu=use_gpu
    )
    exact_time = time.perf_counter() - start
    stats: dict = {
        "size": size,
        "dim": int(np.asarray(train["features"]).shape[1]),
        "kind": kind,
        "metric": metric,
        "k": k,
        "M": M,
        "ef_construction": ef_construction,
        "ef_search": ef_search,
        "splits": {},
        # Run-specific: the index stage moves these out of stats.json (a DVC output) into MLflow and data/timings.
        "timings": {"build_time_s": build_time, "exact_build_time_s": exact_time, "query_time_per_sample_s": {}},
    }
    predictions: dict[str, np.ndarray] = {}
    splits = {"train": {**train, "exclude": train["ids"]}, **eval_splits}
    for split, data in splits.items():
        feats = np.asarray(data["features"], dtype=np.float32)
        if feats.shape[0] == 0:
            continue
        labels = np.asarray(data["labels"], dtype=np.int64)
        exclude = data.get("exclude")
        start = time.perf_counter()
        _, approx_ids, nb_labels = memory.search(feats, k, exclude_ids=exclude)
        query_time = (time.perf_counter() - start) / len(feats)
        _, exact_ids, _ = exact.search(feats, k, exclude_ids=exclude)
        votes = knn_votes(nb_labels, k, num_classes)  # (N, C)
        nn = _one_hot(nb_labels[:, 0], num_classes)  # (N, C)
        stats["splits"][split] = {
            "n": int(len(feats)),
            "self_excluded": exclude is not None,
            f"recall_at_{k}": recall_at_k(approx_ids, exact_ids, k),
            "nn": shot_accuracy(nn, labels, train_counts, many=many, few=few),
            "knn": shot_accuracy(votes, labels, train_counts, many=many, few=few),
        }
        stats["timings"]["query_time_per_sample_s"][split] = query_time
        if split != "train":  # the layout of a teacher's predictions.npz (pipeline.evaluate.predict)
            predictions.update({f"{split}/knn": votes, f"{split}/nn": nn, f"{split}_labels": labels})
        logger.info(
            "%s: recall@%d=%.4f nn=%.4f knn=%.4f",
            split,
            k,
            stats["splits"][split][f"recall_at_{k}"],
            stats["splits"][split]["nn"]["all"],
            stats["splits"][split]["knn"]["all"],
        )
    return memory, stats, predictions
