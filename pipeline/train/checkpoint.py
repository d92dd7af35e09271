"""Resumable checkpoints: written atomically every epoch, loaded with ``weights_only=True``.

A checkpoint holds the method's state (parameters and buffers: momentum encoder, queue and pointer...), the
optimizer, the number of completed epochs, the history of per-epoch metrics, the best state for model selection,
the RNG states and a hash of the config, so that a run with a changed config starts over instead of resuming.

A checkpoint that cannot be read (truncated, foreign, or holding pickled objects that ``weights_only`` refuses) is
ignored with a warning and training starts over. Test hook (``LONGTAIL_TEST_KILL_AT``, see ``pipeline.io``): the
points ``checkpoint:load`` (before the checkpoint is read: nothing trained yet), ``checkpoint:tmp:<epoch>`` (the
checkpoint after ``<epoch>`` epochs is written to its temporary file, not yet renamed) and
``checkpoint:saved:<epoch>`` (right after the rename). A checkpoint inside an epoch (the Trainer's
``checkpoint_every``), after ``<epoch>`` epochs and ``<batch>`` batches of the next, names its points
``checkpoint:tmp:<epoch>.<batch>`` and ``checkpoint:saved:<epoch>.<batch>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import kill_point, remove_stale

logger = logging.getLogger(__name__)


def config_hash(config: Any) -> str:
    """A stable hash of a JSON-serialisable config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_fingerprint(root: str | Path | None = None) -> str:
    """A hash of the project's Python sources (``pipeline/`` and ``stages/``).

    It goes into the checkpoint's config hash: DVC reruns a training stage when its code changes, and the rerun must
    then train again rather than resume a finished checkpoint written by the old code.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for path in sorted([*(root / "pipeline").rglob("*.py"), *(root / "stages").rglob("*.py")]):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def state_digest(module: torch.nn.Module) -> str:
    """A hash of every tensor in ``module.state_dict()`` (names, shapes, dtypes, values).

    Taken before training it identifies the run's starting point beyond its config: the weights of frozen teachers
    and encoders read from other stages' outputs. A retrained teacher then starts its students over instead of
    resuming a checkpoint distilled from the old one.
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)  # 1-D: 0-d tensors cannot be viewed as bytes
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename (removing leftovers of killed runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    where = f"{state.get('epoch')}.{state['batch']}" if state.get("batch") else state.get("epoch")
    try:
        torch.save(state, tmp)
        kill_point("checkpoint:tmp", where)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    kill_point("checkpoint:saved", where)
    _after_save(path)


def _after_save(path: Path) -> None:
    """Hook after each checkpoint write: a pool stage (``LONGTAIL_CHECKPOINT_PUSH`` set by its worker) also queues
    it for a background push to the storage the workers share (:mod:`pipeline.orchestrate.checkpoint_sync`)."""
    if os.environ.get("LONGTAIL_CHECKPOINT_PUSH"):
        from pipeline.orchestrate.checkpoint_sync import push_later

        push_later(path)


def _reason(exc: BaseException) -> str:
    """One line saying why a checkpoint could not be read (torch's refusal text spans many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError):
        detail = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), "")
        return f"refused by torch.load(weights_only=True), it is not plain tensors: {detail or lines[0]}"
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path, expected_hash: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and was written for the same config, else None (and say why)."""
    kill_point("checkpoint:load")
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start over rather than crash
        logger.warning("ignoring unreadable checkpoint %s (%s); starting over", path, _reason(exc))
        return None
    if not isinstance(state, dict):
        logger.warning("ignoring checkpoint %s: it holds a %s, not a checkpoint; starting over", path,
                       type(state).__name__)
        return None
    if state.get("config_hash") != expected_hash:
        logger.warning("checkpoint %s was written for a different config; starting over", path)
        return None
    return state
