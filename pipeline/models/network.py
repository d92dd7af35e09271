"""The inference network every training stage exports: backbone → optional neck → head.

``model.pt`` holds its state_dict (loaded with ``weights_only=True``), ``model.json`` the spec that rebuilds it:

    {"backbone": {"name": "cifar_resnet32", ...kwargs}, "neck": {"dim": 128} | null,
     "head": {"name": "linear", ...kwargs}, "normalize_features": false, "num_classes": 10, "feature_dim": 64,
     "input": {"size": 32, "mean": [...], "std": [...]}, "dist_head": {"name": "linear", ...} (distilled ViTs only)}

``forward_features`` returns the embedding that downstream stages use (index, CBD distillation, NCM, cRT):
the pooled backbone output, after the neck (Dense + ReLU, CBD's ``h``) and L2-normalisation when configured.
``input`` records the preprocessing the network was trained with (side, normalisation), so that a stage feeding it
(a DeiT-LT teacher, a retrieval encoder, evaluation) can prepare images the same way; absent in older specs.

A spec with ``dist_head`` is a distilled ViT (DeiT, METHODS.md §6.1): the backbone's token sequence is
[CLS, DIST, patches]; ``head`` reads the CLS token and ``dist_head`` the DIST token. ``forward_features`` is then the
CLS token (what rebalancing and retrieval use), ``forward_heads`` gives the ``cls``, ``dist`` and ``avg`` logits, and
``forward`` the main prediction ``avg`` = (cls + dist) / 2, the mean of the logits as in DeiT-LT ``engine.evaluate``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.io import load_tensors
from pipeline.models.factory import create_backbone
from pipeline.models.heads import create_head


class Network(nn.Module):
    """backbone (B, 3, H, W) → pooled (B, F) → neck (B, D) → [L2-normalise] → head (B, C).

    With ``spec["dist_head"]``: backbone tokens (B, 2+N, F) → CLS (B, F) → head, DIST (B, F) → dist_head.
    """

    def __init__(self, spec: dict, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = copy.deepcopy(spec)
        bb = dict(spec["backbone"])
        self.backbone = backbone if backbone is not None else create_backbone(bb.pop("name"), **bb)
        dim = self.backbone.num_features
        self.neck: nn.Module | None = None
        if spec.get("neck"):
            self.neck = nn.Sequential(nn.Linear(dim, spec["neck"]["dim"]), nn.ReLU())
            dim = spec["neck"]["dim"]
        self.normalize_features = bool(spec.get("normalize_features", False))
        head = dict(spec["head"])
        self.head = create_head(head.pop("name"), in_features=dim, num_classes=spec["num_classes"], **head)
        self.dist_head: nn.Module | None = None
        if spec.get("dist_head"):
            if not hasattr(self.backbone, "dist_token") or self.neck is not None:
                raise ValueError(f"dist_head needs a distilled ViT backbone (timm VisionTransformerDistilled) and "
                                 f"no neck; got backbone {bb.get('name', type(self.backbone).__name__)!r}")
            dist = dict(spec["dist_head"])
            self.dist_head = create_head(dist.pop("name"), in_features=dim, num_classes=spec["num_classes"], **dist)
        self.spec["feature_dim"] = dim

    @property
    def feature_dim(self) -> int:
        return self.spec["feature_dim"]

    @property
    def distilled(self) -> bool:
        return self.dist_head is not None

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Distilled ViT only: the CLS and DIST token embeddings, (B, F) each, after the final norm."""
        tokens = self.backbone.forward_features(x)  # (B, 2 + N, F): [CLS, DIST, patches]
        return tokens[:, 0], tokens[:, 1]

    def forward_features(self, x: Tensor) -> Tensor:
        if self.distilled:
            f = self.forward_tokens(x)[0]  # the CLS token
        else:
            f = self.backbone(x)  # (B, F) pooled
        if self.neck is not None:
            f = self.neck(f)
        return F.normalize(f, dim=1) if self.normalize_features else f

    def forward_head(self, f: Tensor) -> Tensor:
        return self.head(f)

    def forward_heads(self, x: Tensor) -> dict[str, Tensor]:
        """Logits (B, C) per head: ``main`` for a plain network; ``avg``, ``cls`` and ``dist`` for a distilled one."""
        if not self.distilled:
            return {"main": self.forward(x)}
        cls_tok, dist_tok = self.forward_tokens(x)
        cls, dist = self.head(cls_tok), self.dist_head(dist_tok)
        return {"avg": (cls + dist) / 2, "cls": cls, "dist": dist}

    def forward_heads_and_features(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``forward_heads(x)`` and ``forward_features(x)`` from one pass through the backbone (the same numbers)."""
        if not self.distilled:
            f = self.forward_features(x)
            return {"main": self.head(f)}, f
        cls_tok, dist_tok = self.forward_tokens(x)
        cls, dist = self.head(cls_tok), self.dist_head(dist_tok)
        f = self.neck(cls_tok) if self.neck is not None else cls_tok
        f = F.normalize(f, dim=1) if self.normalize_features else f
        return {"avg": (cls + dist) / 2, "cls": cls, "dist": dist}, f

    def forward(self, x: Tensor) -> Tensor:
        if self.distilled:
            return self.forward_heads(x)["avg"]
        return self.head(self.forward_features(x))


def create_network(spec: dict) -> Network:
    return Network(spec)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_network(net: Network, out_dir: str | Path) -> None:
    """Write ``model.pt`` (state_dict) and ``model.json`` (spec) into ``out_dir``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    _atomic_write(out / "model.pt", lambda p: torch.save(state, p))
    _atomic_write(out / "model.json", lambda p: p.write_text(json.dumps(net.spec, indent=2)))


def load_network(model_dir: str | Path, map_location: str | torch.device = "cpu") -> Network:
    """Rebuild a network from ``model.json`` and load ``model.pt`` (``weights_only=True``: no pickled code)."""
    d = Path(model_dir)
    for name in ("model.json", "model.pt"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} does not exist: run the stage that trains this model first")
    spec = json.loads((d / "model.json").read_text())
    # model.pt holds every weight: never fetch the initial pretrained weights again (offline, or moved files)
    spec["backbone"] = {k: v for k, v in spec["backbone"].items() if k not in ("pretrained", "checkpoint_file")}
    net = Network(spec)
    net.load_state_dict(load_tensors(d / "model.pt", map_location=map_location))
    return net.eval()
