"""Predictions and features of a trained model over the dataset's splits (test transform, in order)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.evaluate.metrics import shot_accuracy


@torch.no_grad()
def run_over(loader: DataLoader, fn: Callable[[Tensor], dict[str, Tensor]], device: torch.device,
             desc: str = "predict") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Apply ``fn`` (images → named tensors) to every batch; concatenate outputs as float32 numpy arrays."""
    outs: dict[str, list[np.ndarray]] = {}
    labels = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        x = batch["images"][0].to(device, non_blocking=device.type == "cuda")
        for name, value in fn(x).items():
            outs.setdefault(name, []).append(value.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}, np.concatenate(labels)


def _joined(heads: dict[str, Tensor], features: Tensor) -> dict[str, Tensor]:
    return {**heads, "__features": features}


def dump_model_outputs(predict_and_embed: Callable[[Tensor], tuple[dict[str, Tensor], Tensor]],
                       embed: Callable[[Tensor], Tensor], loaders: dict[str, DataLoader | None], device: torch.device,
                       out_dir: Path, train_counts: list[int], many: int, few: int) -> dict:
    """Write ``predictions.npz`` (val/test logits per head), ``features.npz`` (train/val/test embeddings).

    ``predict_and_embed(images)`` gives the logits per head and the features of a batch (``Method.predict_and_embed``:
    one backbone pass where it can); the train split is only embedded.

    Returns:
        metrics: ``{split: {head: shot_accuracy}}`` for val and test.
    """
    preds: dict[str, np.ndarray] = {}
    feats: dict[str, np.ndarray] = {}
    metrics: dict[str, dict] = {}
    for split, loader in loaders.items():
        if loader is None:
            continue
        if split == "train":  # only its embeddings are kept: no prediction pass over the largest split
            out, labels = run_over(loader, lambda x: {"__features": embed(x)}, device, split)
            feats[split], feats[f"{split}_labels"] = out["__features"], labels
            continue
        logits, labels = run_over(loader, lambda x: _joined(*predict_and_embed(x)), device, split)
        feats[split], feats[f"{split}_labels"] = logits.pop("__features"), labels
        preds[f"{split}_labels"] = labels
        metrics[split] = {}
        for head, z in logits.items():
            preds[f"{split}/{head}"] = z
            metrics[split][head] = shot_accuracy(z.argmax(1), labels, train_counts, many=many, few=few)
    np.savez(out_dir / "predictions.npz", **preds)
    np.savez(out_dir / "features.npz", **feats)
    return metrics


def load_predictions(model_dir: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(model_dir) / "predictions.npz") as z:
        return {k: z[k] for k in z.files}


def load_features(model_dir: str | Path) -> dict[str, np.ndarray]:
    path = Path(model_dir) / "features.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the model's stage writes it")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
