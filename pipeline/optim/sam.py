"""Sharpness-Aware Minimization (Foret et al., ICLR 2021) as used by Saddle-LongTail (Rangwani et al., NeurIPS 2022).

Follows davda54/sam ``sam.py`` (METHODS.md §3.1): one global gradient norm over all parameter groups, the
perturbation ``e = rho / (||g|| + 1e-12) · g`` (``|p|²``-scaled when ``adaptive``), parameters restored exactly before
the base optimizer's step, which then uses the gradient taken at the perturbed point. Weight decay lives in the base
optimizer, so it is not part of the perturbation.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class SAM(Optimizer):
    """Wraps ``base_optimizer`` on the same param groups, so an lr or rho set on SAM is seen by both.

    Args:
        params: parameters or param groups.
        base_optimizer: an optimizer class (e.g. ``torch.optim.SGD``).
        rho: neighbourhood radius; per group, and changed by the rho schedule through ``param_groups``.
        adaptive: ASAM (Kwon et al. 2021): scale the perturbation by ``|p|``.
        **kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay...).
    """

    def __init__(self, params, base_optimizer: type[Optimizer], rho: float = 0.05, adaptive: bool = False, **kwargs):
        if rho < 0.0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the worst-case point ``w + e(w)``; remember ``w``."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly, then step the base optimizer with the gradient taken at ``w + e(w)``."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or "old_p" not in self.state[p]:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):  # noqa: D102 - SAM needs two passes: use first_step/second_step (SAMUpdate)
        raise RuntimeError("SAM.step is not used: the SAMUpdate strategy calls first_step and second_step")

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
