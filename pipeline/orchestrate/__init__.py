"""Running the DVC pipeline stage by stage, without Prefect: the engine under :mod:`pipeline.flow`.

The DAG is defined once, in ``dvc.yaml``; this package reads it from DVC and runs it, and the Prefect flow and the
local runner (``python -m pipeline.orchestrate run``) are two thin drivers of the same code (DESIGN.md
"Orchestration"). Split by concern so that work pools and other drivers can grow without touching the rest:

* :mod:`~pipeline.orchestrate.graph`: DVC's resolved stage graph and target selection.
* :mod:`~pipeline.orchestrate.overrides`: Hydra overrides applied the way ``dvc exp run -S`` applies them.
* :mod:`~pipeline.orchestrate.execution`: one stage (``dvc --wait-for-lock repro --single-item``) and the scheduler
  that runs a graph over any kind of future.
* :mod:`~pipeline.orchestrate.local`: the Prefect-free runner and its CLI.
* :mod:`~pipeline.orchestrate.priority`: which ready stage starts first (the longest remaining path).
* :mod:`~pipeline.orchestrate.journal_replay`: the stages' MLflow journals, replayed in the runner's process.
* :mod:`~pipeline.orchestrate.workspace`: isolated runs (a git worktree of the pinned commit, saved as a DVC
  experiment).
* :mod:`~pipeline.orchestrate.pool`: one stage on a work-pool worker (checkout, ``dvc pull``, repro, ``dvc push``).

Nothing here imports prefect (only :mod:`pipeline.flow` does) or mlflow (only :mod:`pipeline.tracking` does).
"""
