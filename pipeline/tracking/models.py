"""Helpers of :meth:`pipeline.tracking.mlflow_run.MLflowTracker.log_model` (mlflow imported inside, when a model is
logged): the model's name, its pinned requirements, a CPU copy of the network and two ways to keep mlflow quiet and
fast while it saves the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

from pipeline.tracking.base import _clean_key

logger = logging.getLogger(__name__)

# Modules a pickled ``Network`` needs at load time besides the project itself (pinned to this environment).
_MODEL_REQUIREMENTS = ("torch", "timm", "numpy", "cloudpickle")
# mlflow.pytorch warns on every model saved with ``serialization_format="pickle"``, which ``MLflowTracker.log_model``
# chooses deliberately (see there; the project's own files never unpickle code): nothing a user can act on.
_PICKLE_WARNING = "Saving pytorch model by Pickle or CloudPickle format"


class _DropMessages(logging.Filter):
    """A logger filter that drops records whose message starts with one of ``prefixes`` (and nothing else)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def _quiet_pickle_warning() -> None:
    """Drop mlflow's pickle-format warning (only that message) from the ``mlflow.pytorch`` logger, once."""
    log = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _DropMessages) for f in log.filters):
        log.addFilter(_DropMessages(_PICKLE_WARNING))


def _model_name(name: str) -> str:
    """A LoggedModel name: mlflow refuses ``/ : . % " '`` in it (``teacher@r32`` stays, ``a/b.c`` → ``a-b_c``)."""
    return _clean_key(name).replace("/", "-").replace(":", "-").replace(".", "_") or "model"


def _pip_requirements() -> list[str]:
    """``name==version`` of :data:`_MODEL_REQUIREMENTS` as installed here (mlflow adds itself)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in _MODEL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            logger.debug("%s is not installed; left out of the model's requirements", name)
    return pins


@contextlib.contextmanager
def _pinned_requirements_check() -> Iterator[None]:
    """Make mlflow's check of the model's requirements against this environment cost milliseconds, not a second.

    ``warn_dependency_requirement_mismatches`` (run when a model is saved and again when its input example is
    validated) first maps every importable module to its distribution with ``importlib_metadata
    .packages_distributions()``: 0.4-1.3 s per process in this environment (249 distributions, 96 without
    ``top_level.txt``, so their file lists are read). The map only serves as a fallback for requirements whose
    distribution metadata is missing; ours are pinned from the installed distributions (:func:`_pip_requirements`),
    so an empty map gives the same answer through ``importlib_metadata.version``. It is restored afterwards, so
    requirement *inference* elsewhere in the process still sees the full map. Without that private module (another
    mlflow version) nothing changes but the time.
    """
    try:
        from mlflow.utils import requirements_utils as reqs
    except ImportError:  # pragma: no cover - depends on the mlflow version
        yield
        return
    if getattr(reqs, "_MODULES_TO_PACKAGES", ()) is not None:  # already built (or unknown layout): leave it
        yield
        return
    reqs._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        reqs._MODULES_TO_PACKAGES = None
        reqs._PACKAGES_TO_MODULES = None


def _on_cpu(network: Any) -> Any:
    """``network`` itself when all its tensors are on the CPU, else a CPU copy (a pickled CUDA model needs a GPU)."""
    tensors = [*network.parameters(), *network.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return network
    return copy.deepcopy(network).cpu()
