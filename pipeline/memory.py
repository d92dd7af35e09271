"""Memory as data: score a trained RAC model against a changed retrieval memory without touching its weights.

RAC's memory can "dynamically add or remove datasets" without retraining (Long et al., CVPR 2022, Sec. 4.7;
METHODS.md §8). A ``memory.<name>`` entry names a trained RAC student and the edit: labelled splits whose images
join the memory (their embeddings by the memory's frozen encoder), classes or single entries that leave it. The
student's recipe is rebuilt with that memory, the trained base network (``model.pt``) and retrieval branch
(``branch.pt``) are loaded unchanged, and the val / test predictions of its three heads are written like any model's,
so the report shows the effect per shot group next to the student with its original memory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.build import BuildContext, create_eval_loader, create_method, model_dir
from pipeline.config import ConfigError, MemoryConfig, TrainConfig
from pipeline.evaluate.predict import dump_model_outputs
from pipeline.io import atomic_dir, load_tensors, write_json
from pipeline.train.checkpoint import state_digest
from pipeline.train.trainer import seed_everything

logger = logging.getLogger(__name__)


def score_memory(cfg: MemoryConfig, student: TrainConfig, ctx: BuildContext, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir`` (predictions, features, metrics) for ``students/<cfg.model>`` with the edited memory.

    Args:
        cfg: the edit.
        student: the student's own config (``students.<cfg.model>``), method ``rac``.
        ctx: the build context.
        out_dir: ``data/memory/<name>``, written atomically.

    Returns:
        The metrics: per split and head the shot accuracies, the memory size, and the weight digest (equal to the
        trained student's: nothing was retrained).
    """
    if student.method != "rac":
        raise ConfigError(f"memory: students.{cfg.model} has method {student.method!r}; a memory edit needs rac")
    src = model_dir(ctx, f"students/{cfg.model}")
    if not (src / "branch.pt").is_file():
        raise FileNotFoundError(f"{src / 'branch.pt'} does not exist: rerun student@{cfg.model}")
    edits = {"add_splits": cfg.add_splits, "remove_classes": cfg.remove_classes, "remove_ids": cfg.remove_ids}
    seed_everything(student.seed)
    method = create_method(dataclasses.replace(student, method_args={**student.method_args, "memory": edits}), ctx)
    method.network.load_state_dict(load_tensors(src / "model.pt"))
    method.branch.load_state_dict(load_tensors(src / "branch.pt"))
    method.eval()
    net = method.export()
    d = ctx.dataset
    device = torch.device("cpu")
    loaders = {s: create_eval_loader(ctx, s, device=device, input_spec=net.spec.get("input")) for s in ("val", "test")}
    trained = {"network": state_digest(net), "branch": state_digest(method.branch)}
    with atomic_dir(out_dir) as tmp:
        metrics = dump_model_outputs(method.predict_and_embed, net.forward_features, loaders, device, tmp,
                                     ctx.class_counts, d.many, d.few)
        summary = {"heads": list(method.head_names), "test": metrics.get("test", {}), "val": metrics.get("val", {}),
                   "model": f"students/{cfg.model}", "edits": edits, "memory_size": len(method.retriever),
                   "weights": trained}
        write_json(tmp / "metrics.json", summary)
    logger.info("scored students/%s with a memory of %d entries (%s)", cfg.model, len(method.retriever), edits)
    return summary
