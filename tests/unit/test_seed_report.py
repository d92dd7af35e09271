"""Seed replicas in the report: mean ± std per model and group over the primary run and the replicas, the 2-SE marks
against the CE teacher, the gap closed of the means, the error-bar plot, and where each replica's stages write."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate.report import (
    build_report,
    collect_seed_outputs,
    compare_to_baseline,
    seed_statistics,
    summary_markdown,
)

GROUPS = ("all", "many", "medium", "few")


def _acc(all_: float, many: float = 1.0, medium: float = 0.5, few: float = 0.2) -> dict[str, float]:
    return {"all": all_, "many": many, "medium": medium, "few": few}


def test_seed_statistics_by_hand() -> None:
    runs = {0: {"teachers/ce": _acc(0.70), "students/x": _acc(0.80)},
            1: {"teachers/ce": _acc(0.72), "students/x": _acc(0.84)},
            2: {"teachers/ce": _acc(0.74)}}  # students/x has no replica 2
    stats = seed_statistics(runs)
    ce = stats["teachers/ce"]
    assert ce["n"] == 3 and ce["seeds"] == [0, 1, 2]
    assert ce["all"]["mean"] == pytest.approx(0.72) and ce["all"]["std"] == pytest.approx(0.02)  # ddof=1
    assert ce["all"]["values"] == [0.70, 0.72, 0.74]
    x = stats["students/x"]
    assert x["n"] == 2 and x["all"]["mean"] == pytest.approx(0.82) and x["all"]["std"] == pytest.approx(0.02 * 2**0.5)
    one = seed_statistics({0: {"teachers/ce": _acc(0.7)}})["teachers/ce"]
    assert one["n"] == 1 and one["all"]["mean"] == 0.7 and math.isnan(one["all"]["std"])  # no spread from one seed


def test_two_standard_error_marks_by_hand() -> None:
    """diff = 0.10, SE = sqrt(0.02²/3 + 0.02²/3) = 0.01633: beyond 2 SE; diff 0.02 with the same SE is not."""
    runs = {k: {"teachers/ce": _acc(0.70 + 0.02 * k), "students/far": _acc(0.80 + 0.02 * k),
                "students/near": _acc(0.72 + 0.02 * k)} for k in range(3)}
    vs = compare_to_baseline(seed_statistics(runs), "teachers/ce")
    se = math.sqrt(2 * 0.02**2 / 3)
    assert vs["students/far"]["all"]["diff"] == pytest.approx(0.10)
    assert vs["students/far"]["all"]["se"] == pytest.approx(se)
    assert vs["students/far"]["all"]["significant"] is True
    assert vs["students/near"]["all"]["significant"] is False  # 0.02 < 2 × 0.0163
    assert vs["teachers/ce"]["all"]["significant"] is False
    # identical values in every seed: zero spread, so any non-zero difference is beyond 2 SE; none is not
    assert vs["students/far"]["many"]["diff"] == 0 and vs["students/far"]["many"]["significant"] is False
    single = compare_to_baseline(seed_statistics({0: runs[0]}), "teachers/ce")
    assert single["students/far"]["all"]["significant"] is None  # one seed: no error estimate, no mark
    assert compare_to_baseline(seed_statistics(runs), "teachers/missing") == {}


def _write_predictions(d: Path, logits: np.ndarray, labels: np.ndarray) -> None:
    d.mkdir(parents=True)
    np.savez(d / "predictions.npz", **{"test/main": logits, "test_labels": labels})
    (d / "model.json").write_text("{}")


def _logits(labels: np.ndarray, wrong: int, num_classes: int = 2) -> np.ndarray:
    """One-hot logits that get the first ``wrong`` test images wrong."""
    pred = labels.copy()
    pred[:wrong] = (pred[:wrong] + 1) % num_classes
    return np.eye(num_classes, dtype=np.float32)[pred]


MANIFEST = {"source": "t", "num_classes": 2, "shot_group_sizes": {"many": 1, "medium": 0, "few": 1},
            "thresholds": {"many": 5, "few": 2}, "train_counts": [10, 1]}


def test_report_over_replica_directories(tmp_path: Path) -> None:
    """data/teachers/ce and data/seeds/K/teachers/ce: rows of the primary run, statistics over all three seeds."""
    labels = np.array([0] * 10 + [1] * 10)
    for root, wrong in ((tmp_path, 2), (tmp_path / "seeds/1", 4), (tmp_path / "seeds/2", 6)):
        _write_predictions(root / "teachers/ce", _logits(labels, wrong), labels)
        _write_predictions(root / "upper_bound/ce", _logits(labels, 0), labels)
    runs, got_labels = collect_seed_outputs(tmp_path, {}, [1, 2])
    assert sorted(runs) == [0, 1, 2] and np.array_equal(got_labels, labels)
    report = build_report(runs, got_labels, MANIFEST)
    # class 0 holds the wrong images: 0.8 / 0.6 / 0.4 on class 0, 1.0 on class 1
    assert report["models"]["teachers/ce"]["many"] == pytest.approx(0.8)  # the primary run only
    ce = report["seeds"]["teachers/ce"]
    assert ce["n"] == 3 and ce["many"]["mean"] == pytest.approx(0.6) and ce["many"]["std"] == pytest.approx(0.2)
    assert report["gap_closed"]["models"]["upper_bound/ce"]["many"] == pytest.approx(1.0)  # gap of the means
    text = summary_markdown(report)
    assert "| teachers/ce | 3 | 80.0 ± 10.0 | 60.0 ± 20.0 | – | 100.0 ± 0.0 |" in text
    assert "upper_bound/ce | 3 | 100.0 ± 0.0 ▲ | 100.0 ± 0.0 ▲" in text  # 0 spread: beyond 2 SE of CE
    with pytest.raises(FileNotFoundError, match="seeds.replicas lists 3"):
        collect_seed_outputs(tmp_path, {}, [1, 3])
    # an ensemble whose members a replica lacks: an error in the primary run, left out of the replica
    _write_predictions(tmp_path / "teachers/cb", _logits(labels, 0), labels)
    runs, _ = collect_seed_outputs(tmp_path, {"ce_cb": ["ce", "cb"]}, [1])
    assert "ensemble/ce_cb" in runs[0] and "ensemble/ce_cb" not in runs[1]
    with pytest.raises(ValueError, match="evaluate.ensembles.ce_cb: no predictions for teachers/cb"):
        collect_seed_outputs(tmp_path / "seeds/1", {"ce_cb": ["ce", "cb"]}, [])


def test_report_refuses_a_replica_on_other_test_labels(tmp_path: Path) -> None:
    labels = np.array([0, 1, 0, 1])
    _write_predictions(tmp_path / "teachers/ce", _logits(labels, 0), labels)
    _write_predictions(tmp_path / "seeds/1/teachers/ce", _logits(labels[::-1].copy(), 0), labels[::-1].copy())
    with pytest.raises(ValueError, match="seeds/1: its test labels differ"):
        collect_seed_outputs(tmp_path, {}, [1])


def test_one_seed_report_has_no_spread_and_no_marks() -> None:
    labels = np.array([0, 0, 1, 1])
    report = build_report({"teachers/ce": _logits(labels, 1), "students/x": _logits(labels, 0)}, labels, MANIFEST)
    text = summary_markdown(report)
    assert "| students/x | 1 | 100.0 |" in text and "±" not in text.split("\n\n")[0] and "▲" not in text
    assert "one seed" in text


def test_seed_errorbar_plot(tmp_path: Path) -> None:
    from pipeline.evaluate.plots import plot_seed_errorbars

    runs = {k: {"teachers/ce": _acc(0.70 + 0.02 * k, few=float("nan")), "students/x": _acc(0.8 + 0.01 * k)}
            for k in range(3)}
    stats = seed_statistics(runs)
    path = plot_seed_errorbars(stats, tmp_path / "seeds.png", "teachers/ce", compare_to_baseline(stats, "teachers/ce"))
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replica_roots_and_seed_offsets() -> None:
    """Replica K writes under data/seeds/K and checkpoints/seeds/K and trains with each model's seed + K."""
    from pipeline.config import RebalanceConfig, TrainConfig
    from stages._cli import checkpoint_root, data_root, offset_seed

    assert data_root(0) == Path("data") and data_root(2) == Path("data/seeds/2")
    assert checkpoint_root(0) == Path("checkpoints") and checkpoint_root(1) == Path("checkpoints/seeds/1")
    with pytest.raises(ValueError, match="--seed -1"):
        data_root(-1)
    assert offset_seed(TrainConfig(seed=5), 2).seed == 7 and offset_seed(TrainConfig(seed=5), 0).seed == 5
    assert offset_seed(RebalanceConfig(train=TrainConfig(seed=1)), 2).train.seed == 3


@pytest.mark.parametrize("replicas", [[0], [1, 1], [-2]])
def test_seed_replicas_must_be_distinct_positive_offsets(replicas: list[int]) -> None:
    from pipeline.build import to_schema
    from pipeline.config import ConfigError, SeedsConfig

    with pytest.raises(ConfigError, match="seeds.replicas must be distinct seed offsets >= 1"):
        to_schema(SeedsConfig, {"replicas": replicas}, "seeds")
    assert to_schema(SeedsConfig, {"replicas": [1, 2]}, "seeds").replicas == [1, 2]
