"""Retrieval memory (faiss) and frozen encoders; the only package that imports faiss and open_clip."""

from pipeline.index.memory import (
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
