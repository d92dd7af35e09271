"""Images/s of the project's Trainer against a bare PyTorch loop on the same model, batches and optimizer step.

Each preset is built through ``pipeline.build`` (method, optimizer, updater, loader) on the default digits_lt
dataset. A few batches are collated once up front, so data loading is excluded from both loops. The bare loop runs
the same method work per batch (``prepare_batch`` under no_grad, ``training_step``, backward, ``optimizer.step``,
``on_after_update``) without the Trainer's per-step bookkeeping (NaN guard, metric sums, accuracy, progress bar,
updater indirection). For ``erm_ce`` a plain ``F.cross_entropy(network(x), y)`` loop is timed as well.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._common import default_context, load_preset, write_result
from pipeline.build import create_lr, create_method, create_optimizer, create_train_loader, create_updater
from pipeline.train.trainer import Trainer, TrainerConfig, seed_everything

PRESETS = ["erm_ce", "deit_lt", "paco"]


class _Batches:
    """Pre-collated batches the Trainer iterates like a loader (no sampler, so no ``set_epoch``)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def trainer_epoch(method, cfg, optimizer, updater, batches: list[dict]) -> float:
    """Seconds for one Trainer epoch over ``batches``."""
    trainer = Trainer(method, updater, optimizer, _Batches(batches),
                      TrainerConfig(epochs=cfg.epochs, lr_schedule=create_lr(cfg), seed=cfg.seed, amp="off",
                                    stop_after_epochs=1))
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def bare_epoch(method, optimizer, batches: list[dict]) -> float:
    """Seconds for the same method work per batch in a plain loop."""
    t0 = time.perf_counter()
    method.train()
    method.on_epoch_start(0)
    for step, batch in enumerate(batches):
        with torch.no_grad():
            batch = method.prepare_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = method.training_step(batch).loss
        loss.backward()
        optimizer.step()
        method.on_after_update(step)
    return time.perf_counter() - t0


def plain_ce_epoch(network, optimizer, batches: list[dict]) -> float:
    """Seconds for the textbook loop: forward, cross-entropy, backward, step."""
    t0 = time.perf_counter()
    network.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(network(batch["images"][0]), batch["labels"]).backward()
        optimizer.step()
    return time.perf_counter() - t0


def measure(preset: str, n_batches: int, repeats: int) -> dict:
    cfg = load_preset(preset, num_workers=0)
    ctx = default_context()
    seed_everything(cfg.seed)
    method = create_method(cfg, ctx)
    optimizer, updater = create_optimizer(cfg, method), create_updater(cfg)
    loader = create_train_loader(cfg, ctx, torch.device("cpu"))
    loader.sampler.set_epoch(0)
    batches = list(itertools.islice(itertools.cycle(loader), n_batches))
    images = sum(int(b["labels"].shape[0]) for b in batches)
    loops = {"trainer": lambda: trainer_epoch(method, cfg, optimizer, updater, batches),
             "bare": lambda: bare_epoch(method, optimizer, batches)}
    if preset == "erm_ce":
        loops["plain_ce"] = lambda: plain_ce_epoch(method.network, optimizer, batches)
    for loop in loops.values():  # warm-up (allocator, first-call costs)
        loop()
    times = {name: [] for name in loops}
    for _ in range(repeats):  # interleaved, so drift affects every loop alike
        for name, loop in loops.items():
            times[name].append(loop())
    result = {"batches": n_batches, "batch_size": cfg.batch_size, "views": len(cfg.transforms),
              "backbone": cfg.model.backbone, "repeats": repeats}
    for name, ts in times.items():
        result[f"{name}_images_per_s"] = round(images / statistics.median(ts), 1)
    for name in loops:
        if name != "trainer":
            result[f"trainer_over_{name}"] = round(result["trainer_images_per_s"] / result[f"{name}_images_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    parser.add_argument("--batches", type=int, default=12, help="pre-collated batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loop (median)")
    args = parser.parse_args()
    results = {}
    for preset in args.presets:
        results[preset] = r = measure(preset, args.batches, args.repeats)
        extra = "".join(f"  {k.removesuffix('_images_per_s')} {v}" for k, v in r.items()
                        if k.endswith("_images_per_s") and k not in ("trainer_images_per_s", "bare_images_per_s"))
        print(f"{preset:8s} trainer {r['trainer_images_per_s']:7.1f} img/s  bare {r['bare_images_per_s']:7.1f} img/s"
              f"  ratio {r['trainer_over_bare']:.3f}{extra}", flush=True)
    write_result("trainer_overhead", {"command": "PYTHONPATH=. .venv/bin/python benchmarks/trainer_overhead.py "
                                                 f"--batches {args.batches} --repeats {args.repeats}",
                                      "presets": results})


if __name__ == "__main__":
    main()
