"""The Method interface: everything a training recipe needs, behind hooks the Trainer calls.

A Method owns its modules (student, frozen teachers, momentum encoder, queue, projection, retrieval memory).
The Trainer calls, per optimizer update:

    batch = method.prepare_batch(batch)      # under torch.no_grad(): teacher outputs, momentum keys, retrieval
    out = method.training_step(batch)        # the loss and its parts; pure: SAM may call it twice
    ... the Updater changes parameters ...
    method.on_after_update(step)             # state changes: EMA, queue writes

and per epoch ``on_epoch_start(epoch)`` (DRW switches, schedules). ``predict`` and ``embed`` serve evaluation,
``export`` returns the network that downstream stages load (``model.pt`` + ``model.json``).

Batches are dicts: ``images`` (a list with one tensor (B, C, H, W) per view), ``labels`` (B,), ``index`` (B,).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class StepOutput:
    """What ``training_step`` returns.

    Attributes:
        loss: the scalar to minimise.
        parts: named loss components (detached or not) for logging and the NaN guard.
        logits: (B, C) logits of the main head on this batch, for training accuracy; optional.
    """

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None


class Method(nn.Module):
    """Base class of every training recipe. Subclasses implement ``training_step``, ``predict`` and ``export``."""

    #: names of the heads ``predict`` returns, in order; the first is the model's main prediction.
    head_names: tuple[str, ...] = ("main",)

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer; by default every trainable parameter, one group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        """Once per update, without gradients: add what the loss needs but does not train (teacher outputs...)."""
        return batch

    def training_step(self, batch: dict) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def on_after_update(self, step: int) -> None:
        """Once per optimizer update, after the step: momentum updates, queue writes."""

    def on_epoch_start(self, epoch: int) -> None:
        """At the start of each 0-based epoch: DRW weights, schedules that are pure functions of the epoch."""

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Logits (B, C) per head, in eval mode."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Feature vectors (B, D) of the exported network (what ``features.npz`` holds)."""
        return self.export().forward_features(images)

    @torch.no_grad()
    def predict_and_embed(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``predict(images)`` and ``embed(images)``; a method whose heads are its network's overrides this with the
        network's single pass (``Network.forward_heads_and_features``)."""
        return self.predict(images), self.embed(images)

    def export(self) -> nn.Module:
        """The inference network (a :class:`pipeline.models.network.Network`) saved as ``model.pt``."""
        raise NotImplementedError

    def extra_outputs(self) -> dict[str, dict[str, Tensor]]:
        """Trained state beyond ``export()`` to write next to ``model.pt``: ``{file name: state_dict}``."""
        return {}
