"""Train one model end to end and write the stage contract's files (used by the teacher and student stages).

``out_dir`` receives ``model.pt``, ``model.json``, ``metrics.json``, ``history.json``, ``predictions.npz`` and
``features.npz`` atomically; the resumable checkpoint lives in ``checkpoint_dir`` (a persistent, uncached DVC out).

Every file in ``out_dir`` (and the checkpoint) is a function of the inputs: the same inputs on the same machine and
thread count give the same bytes, so DVC sees an identical rerun as unchanged and reruns nothing downstream. Wall
times are run-specific: they go to the tracker (``epoch_time_s`` per epoch, ``train_time_s``, ``export_time_s``) and
to ``timings_path`` (a JSON file outside every DVC output), never into ``out_dir``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.build import (
    BuildContext,
    create_eval_loader,
    create_lr,
    create_method,
    create_optimizer,
    create_train_loader,
    create_updater,
    resolve_device,
)
from pipeline.config import TrainConfig
from pipeline.evaluate.metrics import shot_accuracy
from pipeline.evaluate.predict import dump_model_outputs, run_over
from pipeline.io import atomic_dir, write_json
from pipeline.models.network import save_network
from pipeline.tracking import write_timings
from pipeline.train import distributed
from pipeline.train.checkpoint import code_fingerprint, config_hash, state_digest
from pipeline.train.method import Method
from pipeline.train.trainer import Trainer, TrainerConfig, seed_everything

logger = logging.getLogger(__name__)


def make_val_fn(ctx: BuildContext, device: torch.device, input_spec: dict | None = None):
    """Validation accuracy of the main head (for logging and ``select: best_val``); None without a val split."""
    loader = create_eval_loader(ctx, "val", device=device, input_spec=input_spec)
    if loader is None:
        return None
    d = ctx.dataset

    def val_fn(method: Method) -> dict[str, float]:
        head = method.head_names[0]
        logits, labels = run_over(loader, lambda x: {head: method.predict(x)[head]}, device, "val")
        acc = shot_accuracy(logits[head].argmax(1), labels, ctx.class_counts, many=d.many, few=d.few)
        return {"acc": acc["all"], **{k: v for k, v in acc.items() if k != "all"}}

    return val_fn


# Settings that change when a checkpoint is written, not what is trained: a run resumes across a change of them.
_NOT_HASHED = ("checkpoint_every",)


def _hashed(cfg: TrainConfig) -> dict:
    """The part of ``cfg`` that identifies a checkpoint (everything but ``_NOT_HASHED``)."""
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_HASHED}


def fit_method(method: Method, cfg: TrainConfig, ctx: BuildContext, checkpoint_dir: Path, tracker: Any,
               stop_after_epochs: int | None = None, extra_hash: Any = None) -> tuple[Trainer, torch.device]:
    """Train ``method`` as ``cfg`` says, resuming from ``checkpoint_dir/checkpoint.pt`` when it matches.

    Images are prepared as the exported network's ``spec["input"]`` says (its own, or its source network's).
    ``cfg.checkpoint_every`` is left out of the config hash: changing only how often checkpoints are written resumes.
    """
    device = resolve_device(cfg.device)
    input_spec = method.export().spec.get("input")
    trainer = Trainer(
        method, create_updater(cfg), create_optimizer(cfg, method),
        create_train_loader(cfg, ctx, device, input_spec=input_spec),
        TrainerConfig(epochs=cfg.epochs, lr_schedule=create_lr(cfg), seed=cfg.seed, amp=cfg.amp,
                      grad_clip=cfg.grad_clip, select=cfg.select, checkpoint_path=checkpoint_dir / "checkpoint.pt",
                      config_hash=config_hash({"train": _hashed(cfg), "extra": extra_hash, "code": code_fingerprint(),
                                               "dataset": ctx.manifest["train_counts"], "init": state_digest(method)}),
                      stop_after_epochs=stop_after_epochs, checkpoint_every=cfg.checkpoint_every,
                      sync_bn=cfg.sync_bn),
        device=device, tracker=tracker, val_fn=make_val_fn(ctx, device, input_spec) if cfg.select == "best_val" or
        ctx.manifest["split_sizes"].get("val") else None,
    )
    trainer.fit()
    return trainer, device


def write_outputs(method: Method, trainer: Trainer, ctx: BuildContext, out_dir: Path, device: torch.device,
                  tracker: Any, extra: dict | None = None, timings_path: Path | None = None) -> dict:
    """Write the trained model's files into ``out_dir`` atomically; return its metrics.

    The wall times of this call (the epochs it trained, the export) go to the tracker and to ``timings_path`` when
    given (``pipeline.tracking.write_timings``), not into ``out_dir``.
    """
    d = ctx.dataset
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        net = method.export()
        save_network(net, tmp)
        for name, state in method.extra_outputs().items():
            torch.save(state, tmp / name)
        net.eval()
        loaders = {s: create_eval_loader(ctx, s, device=device, input_spec=net.spec.get("input"))
                   for s in ("train", "val", "test")}
        metrics = dump_model_outputs(method.predict_and_embed, net.forward_features, loaders, device, tmp,
                                     ctx.class_counts, d.many, d.few)
        summary = {"heads": list(method.head_names), "test": metrics.get("test", {}), "val": metrics.get("val", {}),
                   "epochs": len(trainer.history), **(extra or {})}
        write_json(tmp / "metrics.json", summary)
        write_json(tmp / "history.json", trainer.history)
    export_time = time.perf_counter() - t0
    logger.info("wrote %s in %.1fs", out_dir, export_time)
    timings = {"train_time_s": sum(trainer.epoch_times.values()), "export_time_s": export_time,
               "epochs_trained": len(trainer.epoch_times)}
    span = trainer.train_span  # Unix times of the first epoch's start and the last one's end (see Trainer)
    span = {"train_started_at": span[0], "train_ended_at": span[1]} if span else {}
    write_timings(timings_path, {**timings, **span,
                                 "epoch_time_s": {str(e): t for e, t in trainer.epoch_times.items()}})
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in timings.items() if k != "epochs_trained"}, step=summary["epochs"])
        t0, cpu0 = time.perf_counter(), time.process_time()
        main = method.head_names[0]
        step = summary["epochs"]  # after the last epoch: the step of the final metrics and of the logged model
        final = {f"test/{k}": v for k, v in summary["test"].get(main, {}).items()}
        tracker.log_metrics({k: v for k, v in final.items() if np.isfinite(v)}, step=step)
        tracker.log_artifact(str(out_dir / "metrics.json"))
        for plot in sorted(out_dir.glob("*.png")):
            tracker.log_artifact(str(plot), "plots")
        _log_dataset(tracker, ctx)
        example = _input_example(next((loaders[s] for s in ("test", "val", "train") if loaders[s] is not None), None))
        tracker.log_model(net, out_dir, input_example=example, step=step)
        logger.info("logged %s to the tracker in %.2fs (%.2fs CPU)", out_dir, time.perf_counter() - t0,
                    time.process_time() - cpu0)
    return summary


def _log_dataset(tracker: Any, ctx: BuildContext) -> None:
    """The dataset as the run's train input: one row per class, named by the dataset, digest = the manifest's md5."""
    path = ctx.dataset_dir / "manifest.json"
    m = ctx.manifest
    table = {"class": [str(c) for c in m["classes"]], "train_count": m["train_counts"], "shot_group": m["shot_groups"]}
    tracker.log_dataset(table, name=ctx.dataset.name, digest=hashlib.md5(path.read_bytes()).hexdigest(),
                        source=str(path.resolve()))


def _input_example(loader: Any, max_values: int = 16_384) -> np.ndarray | None:
    """The first few preprocessed images of ``loader``'s split, ``(B, C, H, W)`` float32, at most ``max_values``
    numbers (4 CIFAR images, 1 ImageNet image): mlflow stores the example as JSON text, twice."""
    if loader is None:
        return None
    dataset = loader.dataset
    first = dataset[0]
    per_image = int(np.prod(first[0][0].shape))
    n = max(1, min(4, len(dataset), max_values // per_image))
    batch = loader.collate_fn([first, *(dataset[i] for i in range(1, n))])
    return batch["images"][0].float().numpy()


def train_and_export(cfg: TrainConfig, ctx: BuildContext, out_dir: Path, checkpoint_dir: Path, tracker: Any = None,
                     stop_after_epochs: int | None = None, timings_path: Path | None = None) -> dict | None:
    """Build the Method from ``cfg``, train it (resuming), and write the outputs; None if stopped early.

    ``timings_path``: where the run's wall times go (``pipeline.tracking.write_timings``); None = the tracker and the
    log only.

    Under torchrun (``pipeline.train.distributed``) every rank trains; rank 0 alone writes the outputs and logs to
    the tracker (the others get None and wait at a barrier).
    """
    seed_everything(cfg.seed)  # the initial weights depend on the seed only (the same on every rank)
    method = create_method(cfg, ctx)
    if not distributed.is_main():
        tracker = None
    trainer, device = fit_method(method, cfg, ctx, checkpoint_dir, tracker, stop_after_epochs)
    if not trainer.finished:
        logger.info("stopped after %d of %d epochs (checkpoint kept)", len(trainer.history), cfg.epochs)
        return None
    summary = (write_outputs(method, trainer, ctx, out_dir, device, tracker, timings_path=timings_path)
               if distributed.is_main() else None)
    distributed.barrier()  # the other ranks wait for rank 0's outputs
    return summary
