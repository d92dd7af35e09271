"""The one training loop. It owns time (epochs, device, autocast, schedules, checkpoints, logging), never the recipe.

Per epoch: reseed every RNG from (seed, epoch), ``sampler.set_epoch``, ``method.on_epoch_start``, the lr of the
epoch from a pure schedule, ``updater.on_epoch_start`` (rho); per batch: ``prepare_batch`` without gradients, the
updater's step over the method's ``training_step`` (under autocast, with a NaN/Inf guard naming the loss component),
``on_after_update``. After each epoch: optional validation, metrics to the tracker, and an atomic checkpoint.
Reseeding per epoch makes a run resumed at an epoch boundary bit-identical (on the CPU) to an uninterrupted one.

``history`` (what the checkpoint and the exported ``history.json`` hold) is a function of the inputs only: the wall
time of each epoch goes to the tracker (``epoch_time_s``) and to ``epoch_times``, never into the history, so a rerun
with the same inputs writes byte-identical files and DVC stops the cascade there.

Step-level resume (``checkpoint_every`` = N updates): every N-th update that does not end an epoch also writes the
checkpoint, holding the position inside the epoch (batches done, step, the epoch's partial metric sums, the RNG
states after that update, method and optimizer state). A resumed run selects the same epoch order
(``sampler.set_epoch``), makes the sampler skip the batches already done (``sampler.skip``: they are not loaded; a
loader without it has them loaded and dropped), restores the RNG states once the loader's iterator exists, and
continues: it ends bit-identical (on the CPU) to an uninterrupted run, losing at most N - 1 updates. Augmentations
stay identical across the cut because the training sampler gives each sample its own seed (``pipeline.data``).
Test hook: ``train:update:<step>`` (``pipeline.io.kill_point``) after every update, ``<step>`` counting updates done.

Under ``torchrun`` (``pipeline.train.distributed``, world size W > 1) the loss comes from the Method wrapped in
DistributedDataParallel (gradients averaged over ranks, optionally SyncBatchNorm), the epoch's metric sums are summed
over ranks (a checkpoint inside an epoch holds the global partial sums, resumed on rank 0), and only rank 0 writes
checkpoints and logs metrics.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from tqdm import tqdm

from pipeline.io import kill_point
from pipeline.train import distributed
from pipeline.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.train.method import Method, StepOutput

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or Inf."""


@dataclass
class TrainerConfig:
    """Runtime settings of the loop (not of the recipe).

    Attributes:
        epochs: number of epochs.
        lr_schedule: 0-based epoch → base lr; each param group is scaled by its ``lr_scale`` (default 1).
        seed: base seed; epoch e reseeds every RNG with ``seed * 100003 + e``.
        amp: 'auto' (bf16 on CUDA, off on CPU), 'bf16', 'fp16' (not with SAM) or 'off'.
        grad_clip: max global gradient norm, or None.
        select: 'last' epoch, or 'best_val' (needs ``val_fn``; never the test set).
        checkpoint_path: where the resumable checkpoint lives; None disables checkpoints.
        config_hash: identifies the config a checkpoint belongs to.
        stop_after_epochs: stop after this many epochs in this call (for tests of interruption); None = run all.
        checkpoint_every: also checkpoint every this many updates inside an epoch (step-level resume); None or 0 =
            at the end of every epoch only. It does not change what is trained, so it is not part of the config hash.
        sync_bn: under torchrun, synchronise the trained BatchNorm layers across ranks (CUDA only).
    """

    epochs: int
    lr_schedule: Callable[[int], float]
    seed: int = 0
    amp: str = "auto"
    grad_clip: float | None = None
    select: str = "last"
    checkpoint_path: str | Path | None = None
    config_hash: str = ""
    stop_after_epochs: int | None = None
    checkpoint_every: int | None = None
    sync_bn: bool = False


def _to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=non_blocking)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=non_blocking) for t in v]
        else:
            out[k] = v
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs ``method`` with ``updater`` and ``optimizer`` over ``train_loader`` for ``config.epochs`` epochs.

    Args:
        method: the recipe (``pipeline.train.method.Method``).
        updater: ``StandardUpdate`` or ``SAMUpdate``.
        optimizer: built over ``method.param_groups()``.
        train_loader: a DataLoader whose sampler has ``set_epoch`` (``pipeline.data.samplers``).
        config: :class:`TrainerConfig`.
        device: where to train.
        tracker: receives per-epoch metrics (``pipeline.tracking``); None logs only.
        val_fn: method → metrics dict (must contain 'acc' for ``select='best_val'``).
    """

    def __init__(self, method: Method, updater: Any, optimizer: Optimizer, train_loader, config: TrainerConfig,
                 device: torch.device | str = "cpu", tracker: Any = None,
                 val_fn: Callable[[Method], dict[str, float]] | None = None) -> None:
        self.method, self.updater, self.optimizer = method, updater, optimizer
        self.loader, self.cfg, self.device = train_loader, config, torch.device(device)
        self.tracker, self.val_fn = tracker, val_fn
        self.amp_dtype = self._amp_dtype(config.amp)
        if config.select not in ("last", "best_val"):
            raise ValueError(f"trainer select {config.select!r}; valid: last, best_val")
        if config.select == "best_val" and val_fn is None:
            raise ValueError("select='best_val' needs a validation split (dataset.val_per_class > 0)")
        if config.checkpoint_every is not None and config.checkpoint_every < 0:
            raise ValueError(f"trainer checkpoint_every {config.checkpoint_every}; valid: None or 0 (every epoch), "
                             "or a number of updates >= 1")
        self.history: list[dict[str, float]] = []  # per-epoch metrics: deterministic (no wall times)
        self.epoch_times: dict[int, float] = {}  # epoch → wall seconds, for the epochs this call trained
        # Unix times of the first epoch's start and the last epoch's end in this call (None: nothing trained): with
        # the process's start and exit they give a stage's overhead (benchmarks/stage_overhead.py).
        self.train_span: tuple[float, float] | None = None
        self.best: dict[str, Any] | None = None
        self.start_epoch = 0
        self.start_batch = 0  # batches of ``start_epoch`` already done (a resume inside an epoch)
        self.step = 0
        self.start_step = 0  # the step this call started from (the resumed checkpoint's)
        self._partial: dict[str, Any] | None = None  # partial sums and RNG states of the resumed epoch
        self._ddp: torch.nn.Module | None = None  # the DDP-wrapped training step under torchrun

    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        cuda = self.device.type == "cuda"
        dtypes = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16 if cuda else None}
        if amp not in dtypes:
            raise ValueError(f"trainer amp {amp!r}; valid: {', '.join(dtypes)}")
        if amp == "fp16" and getattr(self.updater, "rho_schedule", None) is not None:
            raise ValueError("SAM with float16 autocast is not supported (no loss scaling across its two passes); "
                             "use amp: bf16")
        if amp == "fp16":
            raise ValueError("amp fp16 needs loss scaling, which this trainer does not do; use amp: bf16 (or auto)")
        return dtypes[amp]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _compute_loss(self, batch: dict, epoch: int) -> Callable[[], StepOutput]:
        def compute() -> StepOutput:
            with self._autocast():
                if self._ddp is not None:
                    loss, parts, logits = self._ddp(batch)
                    out = StepOutput(loss=loss, parts=parts, logits=logits)
                else:
                    out = self.method.training_step(batch)
            for name, value in {"loss": out.loss, **out.parts}.items():
                if not torch.isfinite(value.detach()).all():
                    bad = float(value.detach().float().reshape(-1)[~torch.isfinite(value.detach().reshape(-1))][0])
                    raise NonFiniteLossError(f"loss component {name!r} is {bad} at epoch {epoch}, "
                                             f"step {self.step}; lower the learning rate or check the inputs")
            return out

        return compute

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _state(self, epochs_done: int, batch: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint after ``epochs_done`` epochs and ``batch`` batches of the next (0: an epoch boundary)."""
        return {"epoch": epochs_done, "batch": batch, "partial": partial, "step": self.step,
                "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "best": self.best, "rng": rng_state(),
                "sampler": {"epoch": epochs_done, "batch": batch}, "config_hash": self.cfg.config_hash}

    def _resume(self) -> None:
        if self.cfg.checkpoint_path is None:
            return
        state = load_checkpoint(self.cfg.checkpoint_path, self.cfg.config_hash)
        if state is None:
            return
        fresh = (copy.deepcopy(self.method.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:  # same config, but the model no longer fits it
            self.method.load_state_dict(fresh[0])
            self.optimizer.load_state_dict(fresh[1])
            logger.warning("checkpoint %s does not fit this model (%s); starting over", self.cfg.checkpoint_path,
                           str(exc).splitlines()[0])
            return
        self.history, self.best, self.step = state["history"], state["best"], state["step"]
        self.start_epoch, self.start_step = state["epoch"], state["step"]
        self.start_batch = int(state.get("batch") or 0)
        set_rng_state(state["rng"])
        if self.start_batch:
            self._partial = {**state["partial"], "rng": state["rng"]}
            logger.info("resuming from checkpoint %s at batch %d of epoch %d of %d (step %d)",
                        self.cfg.checkpoint_path, self.start_batch, self.start_epoch + 1, self.cfg.epochs, self.step)
        else:
            logger.info("resuming from checkpoint %s after epoch %d of %d", self.cfg.checkpoint_path,
                        self.start_epoch, self.cfg.epochs)

    # --- the loop ----------------------------------------------------------------------------------------------
    def _set_lr(self, epoch: int) -> float:
        lr = self.cfg.lr_schedule(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _epoch_iterator(self, epoch: int, skip: int) -> tuple[Any, int | None]:
        """The loader's iterator over epoch ``epoch`` after its first ``skip`` batches, and the epoch's batch count."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        batch_size = getattr(self.loader, "batch_size", None)
        in_sampler = bool(skip) and hasattr(sampler, "skip") and batch_size is not None
        if in_sampler:  # the DataLoader never sees the skipped indices: nothing is loaded for them
            sampler.skip(skip * batch_size)
        it = iter(self.loader)
        if skip and not in_sampler:  # a loader without a skipping sampler: load the done batches and drop them
            for _ in range(skip):
                next(it)
        return it, total

    def _checkpoint_due(self, done: int, total: int | None) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and self.cfg.checkpoint_path is not None and self.step % every == 0 and done != total

    def _global_sums(self, sums: dict[str, float], n_seen: int, correct: int) -> tuple[dict[str, float], int, int]:
        """The epoch's metric sums over all ranks (themselves in one process)."""
        if distributed.world_size() == 1:
            return dict(sums), n_seen, correct
        names = sorted(sums)
        total = distributed.all_reduce_sum([n_seen, correct, *(sums[k] for k in names)], self.device)
        return dict(zip(names, total[2:], strict=True)), int(total[0]), int(total[1])

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        seed_everything(self.cfg.seed * 100003 + epoch)
        partial, self._partial = (self._partial, None) if epoch == self.start_epoch else (None, None)
        done = self.start_batch if partial is not None else 0
        it, total = self._epoch_iterator(epoch, done)
        # The iterator exists (it may have drawn DataLoader worker seeds): now fix the RNG stream of the updates.
        if partial is not None:
            set_rng_state(partial["rng"])  # the states right after the checkpointed update
        else:
            seed_everything(self.cfg.seed * 100003 + epoch)
        self.method.train()
        self.method.on_epoch_start(epoch)
        lr = self._set_lr(epoch)
        self.updater.on_epoch_start(epoch, self.optimizer)
        own = partial is not None and distributed.is_main()  # the checkpoint's partial sums are global: rank 0's
        sums: dict[str, float] = dict(partial["sums"]) if own else {}
        n_seen = int(partial["n_seen"]) if own else 0
        correct = int(partial["correct"]) if own else 0
        bar = tqdm(it, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, total=total, initial=done,
                   disable=not sys.stderr.isatty())
        for batch in bar:
            batch = _to_device(batch, self.device)
            with torch.no_grad():
                batch = self.method.prepare_batch(batch)
            out = self.updater.update(self.method, self._compute_loss(batch, epoch), self.optimizer,
                                      self.cfg.grad_clip)
            self.method.on_after_update(self.step)
            self.step += 1
            b = batch["labels"].shape[0]
            n_seen += b
            for name, value in {"loss": out.loss, **out.parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * b
            if out.logits is not None:
                correct += int((out.logits.detach().argmax(1) == batch["labels"]).sum())
            bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
            done += 1
            if self._checkpoint_due(done, total):
                g_sums, g_seen, g_correct = self._global_sums(sums, n_seen, correct)
                if distributed.is_main():
                    save_checkpoint(self.cfg.checkpoint_path, self._state(
                        epoch, done, {"sums": g_sums, "n_seen": g_seen, "correct": g_correct}))
            kill_point("train:update", self.step)
        sums, n_seen, correct = self._global_sums(sums, n_seen, correct)
        metrics = {f"train/{k}": v / max(n_seen, 1) for k, v in sums.items()}
        metrics["train/acc"] = correct / max(n_seen, 1)
        metrics["lr"] = lr
        return metrics

    def fit(self) -> list[dict[str, float]]:
        """Train (resuming if a matching checkpoint exists); leave the selected weights in ``method``."""
        self.method.to(self.device)
        self._resume()
        if distributed.world_size() > 1:  # after the resume: every rank starts from the same weights
            self._ddp = distributed.wrap(self.method, self.device, sync_bn=self.cfg.sync_bn)
        self._log_epoch_size()
        stop = self.cfg.epochs
        if self.cfg.stop_after_epochs is not None:
            stop = min(stop, self.start_epoch + self.cfg.stop_after_epochs)
        started = time.time()
        for epoch in range(self.start_epoch, stop):
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            if self.val_fn is not None:
                self.method.eval()
                metrics.update({f"val/{k}": v for k, v in self.val_fn(self.method).items()})
            self.history.append({"epoch": epoch, **metrics})
            self.epoch_times[epoch] = time.perf_counter() - t0  # run-specific: tracker and log only
            if self.cfg.select == "best_val" and (self.best is None or metrics["val/acc"] > self.best["acc"]):
                self.best = {"acc": metrics["val/acc"], "epoch": epoch,
                             "method": {k: v.detach().clone() for k, v in self.method.state_dict().items()}}
            timed = {**metrics, "epoch_time_s": self.epoch_times[epoch]}
            if self.tracker is not None and distributed.is_main():
                self.tracker.log_metrics({k: v for k, v in timed.items() if math.isfinite(v)}, step=epoch)
            logger.info("epoch %d/%d %s", epoch + 1, self.cfg.epochs,
                        " ".join(f"{k}={v:.4g}" for k, v in timed.items() if k != "epoch"))
            if self.cfg.checkpoint_path is not None and distributed.is_main():
                save_checkpoint(self.cfg.checkpoint_path, self._state(epoch + 1))
        if stop > self.start_epoch:
            self.train_span = (started, time.time())
        if stop == self.cfg.epochs and self.best is not None:
            logger.info("selected epoch %d by validation accuracy %.4f", self.best["epoch"] + 1, self.best["acc"])
            self.method.load_state_dict(self.best["method"])
        self.method.eval()
        return self.history

    def _log_epoch_size(self) -> None:
        """Say how many samples an epoch draws: a class-balanced sampler's epoch is not one pass over the training set
        (classifier-balancing's class-aware epoch is ``max_c n_c · C`` samples, 2.6 passes at IF 10 with the exp
        profile), which is why a cRT epoch on a frozen backbone can take longer than a CE epoch of the whole network."""
        sampler, dataset = getattr(self.loader, "sampler", None), getattr(self.loader, "dataset", None)
        if not hasattr(sampler, "shard_length") or not hasattr(dataset, "__len__") or not distributed.is_main():
            return
        sampler.set_epoch(self.start_epoch)
        samples = sampler.shard_length() * distributed.world_size()
        logger.info("an epoch draws %d samples (%s sampler) from %d training images (%.2f passes)", samples,
                    type(sampler).__name__, len(dataset), samples / max(len(dataset), 1))

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.cfg.epochs
