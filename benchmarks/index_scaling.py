"""Build time, query time and recall@10 of the project's HNSW index against exact search, as the memory grows.

Synthetic vectors (standard normal, dim 64; the hardest case for a graph index, no cluster structure), cosine metric,
HNSW with RAC's settings (M 32, efConstruction 200, efSearch 128), built and searched with
``pipeline.index.memory.build_index`` / ``search``; recall@10 by ``recall_at_k`` against the exact (flat) index.
Sizes grow until the next one's predicted HNSW build time (linear extrapolation × 1.3) passes ``--budget-s``.
Writes results/index_scaling.json and a log-log plot results/index_scaling.png.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks._common import RESULTS, write_result
from pipeline.index.memory import build_index, recall_at_k, search

HNSW = {"M": 32, "ef_construction": 200, "ef_search": 128}


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure(n: int, queries: np.ndarray, dim: int, k: int, rng: np.random.Generator) -> dict:
    db = rng.standard_normal((n, dim), dtype=np.float32)  # (N, D)
    row = {"n": n}
    found = {}
    for kind, kw in (("exact", {}), ("hnsw", HNSW)):
        index, row[f"{kind}_build_s"] = timed(build_index, db, kind=kind, metric="cosine", use_gpu=False, **kw)
        (_, found[kind]), t = timed(search, index, queries, k, metric="cosine")
        row[f"{kind}_query_ms"] = 1000 * t / len(queries)  # per query, batched
        del index
    row[f"recall_at_{k}"] = recall_at_k(found["hnsw"], found["exact"], k)
    return {key: round(v, 5) if isinstance(v, float) else v for key, v in row.items()}


def plot(rows: list[dict], k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    for kind, style in (("hnsw", "o-"), ("exact", "s--")):
        ax1.loglog(n, [r[f"{kind}_build_s"] for r in rows], style, label=kind)
        ax2.loglog(n, [r[f"{kind}_query_ms"] for r in rows], style, label=kind)
    ax3.semilogx(n, [r[f"recall_at_{k}"] for r in rows], "o-")
    for ax, title in ((ax1, "build time (s)"), (ax2, "query time (ms / query, batched)"),
                      (ax3, f"HNSW recall@{k} vs exact")):
        ax.set_title(title)
        ax.set_xlabel("vectors in the index (dim 64)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.legend()
    fig.suptitle("pipeline.index.memory: HNSW (M 32, efC 200, efS 128, cosine) vs exact, 2-core CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "index_scaling.png", dpi=120)
    print(f"wrote {RESULTS / 'index_scaling.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip sizes whose predicted build passes this")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)  # (Q, D)
    rows, skipped = [], []
    for n in args.sizes:
        if rows and rows[-1]["hnsw_build_s"] * n / rows[-1]["n"] * 1.3 > args.budget_s:
            skipped.append(n)
            continue
        rows.append(measure(n, queries, args.dim, args.k, rng))
        r = rows[-1]
        print(f"n {n:>9,}  build hnsw {r['hnsw_build_s']:8.2f} s exact {r['exact_build_s']:6.3f} s  "
              f"query hnsw {r['hnsw_query_ms']:.3f} ms exact {r['exact_query_ms']:.3f} ms  "
              f"recall@{args.k} {r[f'recall_at_{args.k}']:.4f}", flush=True)
    if skipped:
        print(f"skipped (predicted HNSW build over {args.budget_s:.0f} s): {skipped}")
    plot(rows, args.k)
    write_result("index_scaling", {"command": "PYTHONPATH=. .venv/bin/python benchmarks/index_scaling.py "
                                              f"--budget-s {args.budget_s:g}",
                                   "dim": args.dim, "queries": args.queries, "k": args.k, "hnsw": HNSW,
                                   "data": "standard normal", "rows": rows, "skipped_sizes": skipped})


if __name__ == "__main__":
    main()
