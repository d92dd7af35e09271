"""A training stage's outputs are a function of its inputs: two runs from scratch write the same bytes (model,
metrics, history, predictions, features and the resumable checkpoint), and the wall times go only to the tracker and to
the timings file outside them. The same for the index stage's ``stats.json`` (its times are in ``stats["timings"]``,
which the stage moves out)."""

from __future__ import annotations

import json

import numpy as np

from pipeline.index.memory import build_memory_stats
from pipeline.train.run import train_and_export


class _Recorder:
    """A tracker that keeps the metrics it is given."""

    run_id = None

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)

    def __getattr__(self, name):  # log_artifact, log_model, log_dataset...: ignored
        return lambda *args, **kwargs: None


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_training_outputs_are_byte_identical_and_timings_are_outside(make_train_config, build_ctx, tmp_path):
    cfg = make_train_config(epochs=2)
    tracker = _Recorder()
    runs = []
    for i in range(2):
        out, ckpt, timings = tmp_path / f"out{i}", tmp_path / f"ckpt{i}", tmp_path / "timings" / f"run{i}.json"
        train_and_export(cfg, build_ctx, out, ckpt, tracker=tracker if i else None, timings_path=timings)
        runs.append((_files(out), _files(ckpt), json.loads(timings.read_text())))
    (out_a, ckpt_a, timings_a), (out_b, ckpt_b, _) = runs
    assert {"model.pt", "metrics.json", "history.json", "predictions.npz", "features.npz"} <= set(out_a)
    assert out_a == out_b and ckpt_a == ckpt_b
    for name in ("metrics.json", "history.json"):
        assert "time" not in out_a[name].decode()
    assert timings_a["epochs_trained"] == 2 and set(timings_a["epoch_time_s"]) == {"0", "1"}
    assert timings_a["train_time_s"] > 0 and timings_a["export_time_s"] > 0
    assert {"epoch_time_s", "train_time_s", "export_time_s"} <= set(tracker.metrics)


def test_index_stats_keep_times_apart():
    rng = np.random.default_rng(0)
    feats, labels = rng.standard_normal((40, 8)), np.repeat(np.arange(4), [16, 12, 8, 4])
    test = {"test": {"features": feats[:8], "labels": labels[:8]}}
    stats = [build_memory_stats({"features": feats, "labels": labels, "ids": np.arange(40)}, test,
                                train_counts=[16, 12, 8, 4], kind="hnsw", metric="cosine", k=3)[1] for _ in range(2)]
    timings = [s.pop("timings") for s in stats]
    assert set(timings[0]) == {"build_time_s", "exact_build_time_s", "query_time_per_sample_s"}
    assert set(timings[0]["query_time_per_sample_s"]) == {"train", "test"}
    assert json.dumps(stats[0]) == json.dumps(stats[1]) and "time" not in json.dumps(stats[0])
