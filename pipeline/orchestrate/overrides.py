"""Config overrides applied to the params files exactly as ``dvc exp run -S`` applies them.

The flow takes overrides in the Hydra grammar so a run from the Prefect UI means the same as ``dvc exp run -S`` on
the command line (DESIGN.md "Config"). This reuses DVC's own helpers (DVC 3.67.1
``dvc/repo/experiments/queue/base.py::_update_params``) instead of re-implementing the composition. The flow applies
them in an isolated worktree (:mod:`.workspace`), or on a pool worker in its clone (:mod:`.pool`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def apply_overrides(repo_root: str | os.PathLike[str], overrides: list[str]) -> None:
    """Apply Hydra-grammar overrides to the params files the way ``dvc exp run -S`` does.

    With ``hydra.enabled`` in the DVC config, ``params.yaml`` is recomposed from ``conf/`` (``hydra.config_dir``,
    ``hydra.config_name``) plus the overrides and overwritten; other files (``file.yaml:key=value``), or all files
    when Hydra is off, get the overrides applied in place. Does nothing when ``overrides`` is empty.

    Args:
        repo_root: root of the DVC repository.
        overrides: e.g. ``["dataset=cifar10_lt", "teachers.r32.epochs=5"]``.

    Raises:
        ValueError: a sweep override (``lr=0.1,0.2``), which ``dvc exp run`` accepts only with ``--queue``.
    """
    if not overrides:
        return
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides
    from dvc.utils.hydra import compose_and_dump, to_hydra_overrides

    root = Path(repo_root).resolve()
    path_overrides = to_path_overrides(overrides)
    sweeps = [x for ovs in path_overrides.values() for x in to_hydra_overrides(ovs) if x.is_sweep_override()]
    if sweeps:
        raise ValueError(
            f"Sweep overrides {[str(x.input_line) for x in sweeps]} are not supported by the flow; run one value per "
            "flow run, or use `dvc exp run --queue -S ...` + `dvc queue start`"
        )
    with Repo(os.fspath(root)) as repo:
        hydra_config = repo.config.get("hydra", {})
    hydra_enabled = bool(hydra_config.get("enabled", False))
    for path, ovs in path_overrides.items():
        target = root / path
        if hydra_enabled and path == ParamsDependency.DEFAULT_PARAMS_FILE:
            config_module = hydra_config.get("config_module")
            config_dir = None if config_module else os.fspath(root / hydra_config.get("config_dir", "conf"))
            compose_and_dump(
                target,
                config_dir,
                config_module,
                hydra_config.get("config_name", "config"),
                os.fspath(root / hydra_config.get("plugins_path", "")),
                ovs,
            )
            logger.info("Composed %s from %s with %s", target, config_dir or config_module, ovs)
        else:
            dvc_apply_overrides(target, ovs)
            logger.info("Applied %s to %s", ovs, target)
