"""Compose ``conf/`` into the ``params.yaml`` dict exactly as DVC's Hydra integration does on ``dvc exp run``.

DVC (``dvc/utils/hydra.py::compose_and_dump``) calls ``initialize_config_dir`` + ``compose(config_name, overrides)``,
resolves interpolations and overwrites ``params.yaml``. This module does the same for ``make params``, the test that
``params.yaml`` equals the composition, and the Prefect flow's overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def compose(conf_dir: str | Path = "conf", overrides: list[str] | None = None, config_name: str = "config") -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)


def dump(params: dict[str, Any], path: str | Path = "params.yaml") -> None:
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=120))


if __name__ == "__main__":
    import sys

    dump(compose(overrides=sys.argv[1:]))
