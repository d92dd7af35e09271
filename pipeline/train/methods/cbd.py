"""Class-Balanced Distillation (Iscen et al., BMVC 2021), google-research ``class_balanced_distillation``.

A fresh student (backbone → ``h`` = Dense(proj_dim) + ReLU → L2-normalise → cosine classifier with σ = 20) learns
from one teacher (CBD) or the concatenation of several teachers' L2-normalised features (CBD-ENS), METHODS.md §7.3:

    L = (1 − α) · CE(student_logits, y) + α · β · mean_i (1 − cos(h(v_i), concat_t v_t,i)),   α = 0.4, β = 100

Teachers are frozen and always in eval mode (``train`` is overridden, as DINOv2 keeps its teacher); their features are
computed once per update in ``prepare_batch``. Class-balanced sampling (§7.3) is the ``cbd`` sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses import CBDDistillLoss
from pipeline.models.network import Network
from pipeline.train.method import Method, StepOutput


class CBD(Method):
    """Feature distillation from frozen teachers into a student with a class-balanced cosine classifier.

    Args:
        network: the student; its ``forward_features`` must give (B, Σ teacher dims), normalised (the neck ``h``).
        teachers: frozen teacher networks (their ``forward_features`` are L2-normalised here).
        alpha: weight of the distillation term against CE (0.4).
        beta: scale of the cosine distance (100).
    """

    def __init__(self, network: Network, teachers: list[nn.Module], alpha: float = 0.4, beta: float = 100.0) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("CBD needs at least one teacher (method_args.teachers)")
        self.network = network
        self.teachers = nn.ModuleList(teachers)
        self.teachers.requires_grad_(False)
        self.teachers.eval()
        self.loss = CBDDistillLoss(alpha=alpha, beta=beta)

    def train(self, mode: bool = True) -> CBD:
        super().train(mode)
        self.teachers.eval()  # frozen teachers never switch to training mode (BN statistics stay fixed)
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.network.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        x = batch["images"][0]
        feats = [F.normalize(t.forward_features(x).float(), dim=1) for t in self.teachers]  # K × (B, D_t)
        return {**batch, "teacher_features": torch.cat(feats, dim=1)}  # (B, Σ D_t)

    def training_step(self, batch: dict) -> StepOutput:
        f = self.network.forward_features(batch["images"][0])  # (B, Σ D_t), normalised
        logits = self.network.forward_head(f)
        out = self.loss(logits.float(), batch["labels"], f.float(), batch["teacher_features"])
        parts = {"ce": out["ce"].detach(), "distill": out["feature_distill"].detach()}
        return StepOutput(loss=out["loss"], parts=parts, logits=logits)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        return {"main": self.network(images)}

    def export(self) -> Network:
        return self.network

    @torch.no_grad()
    def predict_and_embed(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.network.forward_heads_and_features(images)  # one backbone pass for logits and features
