"""Plots are written as non-empty PNG files and tolerate NaN values."""

import numpy as np

from pipeline.evaluate.plots import plot_per_class_accuracy, plot_split_bars, plot_tau_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG


def test_per_class_plot_with_nan(tmp_path):
    counts = np.array([500, 100, 20, 5])
    curves = {"ce": np.array([0.9, 0.5, np.nan, 0.1]), "crt": np.array([0.8, 0.6, 0.4, 0.3])}
    out = plot_per_class_accuracy(curves, counts, tmp_path / "sub" / "per_class.png")
    assert _is_png(out)


def test_split_bars_with_nan(tmp_path):
    table = {"ce": {"all": 0.5, "many": 0.8, "medium": 0.4, "few": float("nan")}, "nn": {"all": 0.3}}
    assert _is_png(plot_split_bars(table, tmp_path / "bars.png"))


def test_tau_sweep_plot(tmp_path):
    sweep = [
        {"tau": t, "val": {"all": 0.5 + t / 10, "many": 0.7, "medium": 0.4, "few": float("nan")}}
        for t in (0.0, 0.5, 1.0)
    ]
    assert _is_png(plot_tau_sweep(sweep, tmp_path / "tau.png", split="val"))
    assert not list(tmp_path.glob("*.tmp*"))
