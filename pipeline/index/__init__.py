"""Retrieval memory (faiss) and frozen encoders; the only package that imports faiss and open_clip."""

import logging

# faiss's loader logs at INFO every optimised build it probes and fails to import ("Could not load library with
# AVX512 support due to: ModuleNotFoundError(No module named 'faiss.swigfaiss_avx512')"), before it loads the one
# that fits this CPU: noise in every stage log. A failure to load faiss at all still raises ImportError. A level the
# user set on that logger is kept.
if logging.getLogger("faiss.loader").level == logging.NOTSET:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

from pipeline.index.memory import (  # noqa: E402
    RetrievalMemory,
    build_index,
    build_memory_stats,
    knn_predict,
    knn_votes,
    recall_at_k,
    search,
)

__all__ = [
    "RetrievalMemory",
    "build_index",
    "build_memory_stats",
    "knn_predict",
    "knn_votes",
    "recall_at_k",
    "search",
]
