"""Optimizers (SAM) and schedules as pure functions of the epoch."""

from pipeline.optim.sam import SAM

__all__ = ["SAM"]
