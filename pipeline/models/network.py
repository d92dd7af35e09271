"""The inference network every training stage exports: backbone → optional neck → head.

``model.pt`` holds its state_dict (loaded with ``weights_only=True``), ``model.json`` the spec that rebuilds it:

    {"backbone": {"name": "cifar_resnet32", ...kwargs}, "neck": {"dim": 128} | null,
     "head": {"name": "linear", ...kwargs}, "normalize_features": false, "num_classes": 10, "feature_dim": 64}

``forward_features`` returns the embedding that downstream stages use (index, CBD distillation, NCM, cRT):
the pooled backbone output, after the neck (Dense + ReLU, CBD's ``h``) and L2-normalisation when configured.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbones import create_backbone
from pipeline.models.heads import create_head


class Network(nn.Module):
    """backbone (B, 3, H, W) → pooled (B, F) → neck (B, D) → [L2-normalise] → head (B, C)."""

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
        self.spec["feature_dim"] = dim

    @property
    def feature_dim(self) -> int:
        return self.spec["feature_dim"]

    def forward_features(self, x: Tensor) -> Tensor:
        f = self.backbone(x)  # (B, F) pooled
        if self.neck is not None:
            f = self.neck(f)
        return F.normalize(f, dim=1) if self.normalize_features else f

    def forward_head(self, f: Tensor) -> Tensor:
        return self.head(f)

    def forward(self, x: Tensor) -> Tensor:
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
    net.load_state_dict(torch.load(d / "model.pt", map_location=map_location, weights_only=True))
    return net.eval()
