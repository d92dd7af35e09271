"""Registers ``${longtail.reads:}`` (``pipeline.compose``) when DVC composes ``conf/`` on ``dvc exp run``.

DVC adds the repository root (``hydra.plugins_path``) to ``sys.path`` and runs Hydra's plugin discovery, which imports
every module of the ``hydra_plugins`` package (treeverse/dvc#9731, PR #10240); this module is not a Hydra plugin.
"""

from pipeline.compose import register_resolver

register_resolver()
