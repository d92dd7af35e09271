"""Share of a training epoch spent in data loading, for the CE and DeiT-LT presets, num_workers 0 vs 2.

Per preset and worker count, on the default digits_lt train split with the preset's transforms and sampler:
``loader``: one epoch of iterating the loader alone; ``epoch``: one full Trainer epoch over the same loader;
``compute``: a Trainer epoch over the same batches collated beforehand (no loading). ``loader / epoch`` is the
share of loading when it is serial (0 workers); ``(epoch - compute) / epoch`` is the time the loop actually waits
for data (with workers loading overlaps compute, and on 2 cores they compete with it). Medians after a warm-up
epoch, which also starts the persistent workers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._common import default_context, load_preset, write_result
from benchmarks.trainer_overhead import _Batches
from pipeline.build import create_lr, create_method, create_optimizer, create_train_loader, create_updater
from pipeline.train.trainer import Trainer, TrainerConfig, seed_everything

PRESETS = ["erm_ce", "deit_lt"]


def loader_epoch(loader) -> float:
    loader.sampler.set_epoch(0)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def train_epoch(method, cfg, loader) -> float:
    trainer = Trainer(method, create_updater(cfg), create_optimizer(cfg, method), loader,
                      TrainerConfig(epochs=cfg.epochs, lr_schedule=create_lr(cfg), seed=cfg.seed, amp="off",
                                    stop_after_epochs=1))
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def measure(preset: str, workers: int, repeats: int) -> dict:
    cfg = load_preset(preset, num_workers=workers)
    ctx = default_context()
    seed_everything(cfg.seed)
    method = create_method(cfg, ctx)
    loader = create_train_loader(cfg, ctx, torch.device("cpu"))
    batches = list(loader)
    images = sum(int(b["labels"].shape[0]) for b in batches)
    loops = {"loader": lambda: loader_epoch(loader), "epoch": lambda: train_epoch(method, cfg, loader),
             "compute": lambda: train_epoch(method, cfg, _Batches(batches))}
    times = {name: [] for name in loops}
    for loop in loops.values():
        loop()  # warm-up
    for _ in range(repeats):
        for name, loop in loops.items():
            times[name].append(loop())
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"num_workers": workers, "batches": len(batches), "images": images,
            **{f"{name}_s": round(t, 3) for name, t in med.items()},
            "loader_share": round(med["loader"] / med["epoch"], 3),
            "wait_share": round(max(med["epoch"] - med["compute"], 0.0) / med["epoch"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results = {}
    for preset in args.presets:
        for workers in args.workers:
            results[f"{preset}/w{workers}"] = r = measure(preset, workers, args.repeats)
            print(f"{preset:8s} workers {workers}: loader {r['loader_s']:.3f} s  epoch {r['epoch_s']:.3f} s  "
                  f"compute {r['compute_s']:.3f} s  loader/epoch {r['loader_share']:.0%}  "
                  f"waiting {r['wait_share']:.0%}", flush=True)
    write_result("data_loading", {"command": "PYTHONPATH=. .venv/bin/python benchmarks/data_loading.py "
                                             f"--repeats {args.repeats}", "runs": results})


if __name__ == "__main__":
    main()
