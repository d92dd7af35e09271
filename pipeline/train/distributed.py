"""Data-parallel training under ``torchrun``: process group, rank queries, gathers, PaCo's batch shuffle, DDP wrap.

How to run (``docs/distributed.md``): a training entry with ``nproc: N`` (N > 1) makes its stage re-exec itself as
``python -m torch.distributed.run --standalone --nproc_per_node N -m <module> <args>`` (:func:`relaunch`), so
``dvc repro`` runs the unchanged ``cmd``; one may also start ``torchrun`` by hand. :func:`init` reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` and joins the group: gloo on the CPU, nccl on CUDA with device
``cuda:LOCAL_RANK`` (written as the official code does, not measured on this project's CPU machine).

What is distributed:

* data: every training sampler is sharded by rank (``EpochSampler.configure``): rank r takes positions
  r, r + W, ... of the same per-(seed, epoch) global order, each rank loads ``batch_size / W`` per update, and each
  sample keeps the augmentation seed of its global position, so the ranks' batches together are exactly the
  single-process batch;
* gradients: :func:`wrap` wraps the Method in ``DistributedDataParallel`` through an adapter whose ``forward`` is
  ``training_step``; only the parameters the optimizer trains (``method.param_groups()``) take part. Frozen
  teachers, PaCo's momentum key encoder and queue, RAC's retrieval memory and every buffer are registered as
  ignored: never broadcast, never reduced (``broadcast_buffers=False``: BatchNorm statistics are per rank, and rank
  0's are the ones exported). DDP averages gradients, so a loss that is a mean over the local batch gives the
  gradient of the mean over the global batch (exactly, up to float summation order, when BatchNorm is in eval mode
  or synchronised);
* SAM: each of its two passes is an ordinary DDP forward/backward, so both gradients are all-reduced: the
  perturbation is computed from the global-batch gradient (identical on every rank, which keeps the replicas in
  sync) and the update from the global-batch gradient at the perturbed point, i.e. single-process SAM on the global
  batch (not per-rank "m-sharpness");
* SyncBatchNorm (``sync_bn: true``): the BatchNorm layers with trained parameters become ``nn.SyncBatchNorm``
  (batch statistics over the global batch); CUDA only (PyTorch has no CPU kernel), refused on the CPU;
* PaCo (MoCo v2 semantics, ``facebookresearch/moco`` ``builder.py``): the key images are shuffled across ranks
  before the key encoder and the keys unshuffled after it (:func:`batch_shuffle` / :func:`batch_unshuffle`, a
  permutation broadcast from rank 0), and the queue receives :func:`concat_all_gather` of every rank's keys and
  labels. In one process each is the identity (no RNG drawn), so single-process runs are unchanged;
* outputs: checkpoints, the exported model, metrics and MLflow logging are written by rank 0 only; the other ranks
  wait at a barrier.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its rank variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def init(device: str = "auto") -> torch.device | None:
    """Join the process group described by torchrun's environment; None when not under torchrun with WORLD_SIZE > 1.

    Args:
        device: the training entry's device (auto, cpu, cuda): CUDA uses nccl and ``cuda:LOCAL_RANK``, the CPU gloo.

    Returns:
        This rank's device, or None in a single process.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return None
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    if not is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    logger.info("rank %d of %d (%s)", rank(), world_size(), "nccl" if cuda else "gloo")
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def local_batch_size(global_batch: int) -> int:
    """The per-rank batch: ``global_batch / world_size`` (it must divide)."""
    w = world_size()
    if global_batch % w:
        raise ValueError(f"batch_size {global_batch} is not divisible by nproc {w}: each rank loads batch_size / "
                         "nproc samples per update; pick a batch_size that is a multiple of nproc")
    return global_batch // w


# --- collectives ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order; no gradient (MoCo's ``concat_all_gather``).

    In one process: ``tensor`` itself.
    """
    w = world_size()
    if w == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(w)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """MoCo's ``_batch_shuffle_ddp``: this rank's slice of the gathered batch under a permutation from rank 0.

    Args:
        x: (B, ...) this rank's batch (the same B on every rank).

    Returns:
        (B, ...) the shuffled local batch and the (W·B,) inverse permutation for :func:`batch_unshuffle`; in one
        process ``(x, None)`` (no RNG drawn).
    """
    w = world_size()
    if w == 1:
        return x, None
    x_all = concat_all_gather(x)  # (W·B, ...)
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(w, -1)[rank()]  # (B,)
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: Tensor, idx_unshuffle: Tensor | None) -> Tensor:
    """MoCo's ``_batch_unshuffle_ddp``: undo :func:`batch_shuffle` on its outputs (identity in one process)."""
    if idx_unshuffle is None:
        return x
    x_all = concat_all_gather(x)  # (W·B, ...)
    return x_all[idx_unshuffle.view(world_size(), -1)[rank()]]


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over ranks of ``values`` (float64; the values themselves in one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- DDP ------------------------------------------------------------------------------------------------------------
class _TrainingStep(nn.Module):
    """``forward(batch)``: ``method.training_step(batch)`` as a tuple (DDP finds tensors in tuples, not dataclasses)."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        out = self.method.training_step(batch)
        return out.loss, out.parts, out.logits


def _trained(method: nn.Module) -> set[int]:
    return {id(p) for g in method.param_groups() for p in g["params"]}


def convert_sync_bn(method: nn.Module) -> int:
    """Replace the BatchNorm layers whose parameters are trained by ``nn.SyncBatchNorm``; return how many.

    Frozen BatchNorm (teachers, PaCo's key encoder) stays per rank. The parameters and buffers are the same tensor
    objects, so an optimizer built before keeps working.
    """
    trained = _trained(method)
    count = 0
    for parent in list(method.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm) and any(
                    id(p) in trained for p in child.parameters(recurse=False)):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                count += 1
    return count


def wrap(method: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """The module whose ``forward(batch)`` the Trainer calls for the loss: DDP over the trained parameters only.

    Args:
        method: the Method, already on ``device``, its state identical on every rank.
        device: this rank's device.
        sync_bn: convert the trained BatchNorm layers to ``nn.SyncBatchNorm`` (CUDA only).
    """
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn: true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); set sync_bn: "
                             "false for gloo on the CPU")
        logger.info("SyncBatchNorm: %d layers", convert_sync_bn(method))
    step = _TrainingStep(method)
    trained = _trained(method)
    ignore = [n for n, p in step.named_parameters() if id(p) not in trained]
    ignore += [n for n, _ in step.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, ignore)
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=True)  # a Method may leave some trained parameter out of a step's loss


# --- launching ------------------------------------------------------------------------------------------------------
def relaunch_command(nproc: int, argv: Sequence[str] | None = None) -> list[str] | None:
    """The torchrun command that reruns this process on ``nproc`` ranks, or None when no relaunch is needed.

    None when ``nproc <= 1`` or already under torchrun. ``argv`` defaults to ``sys.argv``; the program is this
    process's module (``python -m stages.teacher ...``) or its script path.
    """
    if nproc <= 1 or under_torchrun():
        return None
    argv = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name else [argv[0]]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(nproc)),
            *program, *argv[1:]]


def relaunch(nproc: int) -> None:
    """Replace this process by ``torchrun`` on ``nproc`` ranks running the same command (see :func:`relaunch_command`).

    Returns only when no relaunch is needed. ``os.execv`` keeps the pid, so a process group killed by a preempted
    worker (or DVC's own signal handling) reaches torchrun and its ranks.
    """
    cmd = relaunch_command(nproc)
    if cmd is None:
        return
    logger.info("relaunching under torchrun: %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
