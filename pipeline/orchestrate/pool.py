"""One stage on a work-pool worker: its clone at the pinned commit, inputs from the DVC remote, outputs back to it.

A worker (``prefect worker start --pool <pool> --type process --limit 1``) runs in its own git clone of the
repository with a DVC remote it shares with the submitting side. For each stage it is sent
(:func:`pipeline.flow.longtail_stage`), it:

1. checks out the commit the run pinned (``git checkout --force --detach <rev>``; ``git fetch`` first when the clone
   lacks it), composes ``params.yaml`` from ``conf/`` + the run's overrides (the same composition as the submitting
   side), and writes the ``dvc.lock`` entries of the stages upstream of it (as their workers recorded them) into
   its ``dvc.lock``;
2. ``dvc pull <upstream stages>``: exactly the outputs this stage reads, by the hashes those entries name;
3. ``dvc --wait-for-lock repro --single-item <stage>`` (:func:`pipeline.orchestrate.execution.run_stage`);
4. ``dvc push <stage>`` and ``dvc push --run-cache``: the stage's cached outputs, and its run-cache entry, which also
   carries the outputs kept out of the cache that are not ``persist`` (the ``evaluate`` reports and metrics);
5. returns the stage's new ``dvc.lock`` entry, which downstream stages (and the submitting side's experiment) use.

Outputs with ``persist: true, cache: false`` (resumable checkpoints) are skipped by ``dvc push``; they reach the
other workers through :mod:`pipeline.orchestrate.checkpoint_sync` instead (pushed after each write, fetched before a
stage runs), so a stage whose worker was lost resumes elsewhere. Nothing downstream reads them.

The dvc.lock entries travel as flow-run parameters and results (a Prefect artifact); the data only through the DVC
remote. Nothing here imports prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.orchestrate.execution import Log, run_stage
from pipeline.orchestrate.overrides import apply_overrides

logger = logging.getLogger(__name__)

WORKER_REPO_ENV = "LONGTAIL_WORKER_REPO"  # the clone a worker runs stages in (default: where `pipeline` lives)
LOCK_FILE = "dvc.lock"


class PoolStageError(RuntimeError):
    """A step of a pool stage (checkout, pull, push) failed."""


def worker_repo() -> Path:
    """The worker's clone: ``$LONGTAIL_WORKER_REPO``, else the repository this ``pipeline`` package lives in."""
    env = os.environ.get(WORKER_REPO_ENV)
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def _run(cmd: list[str], root: Path, log: Log, what: str) -> str:
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise PoolStageError(f"{what} failed in {root} (exit {proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    if out:
        log.info("%s: %s", what, out[-2000:])
    return proc.stdout


def _dvc(root: Path, args: list[str], log: Log, what: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root, log, what)


def checkout_revision(root: Path, rev: str, log: Log = logger) -> None:
    """Put the clone at ``rev`` (detached), fetching from its git remotes when the commit is missing.

    Tracked files are reset (``--force``): the clone belongs to the worker, and the previous run left its composed
    ``params.yaml`` and ``dvc.lock`` there. Ignored files (``data/``, ``checkpoints/``, the DVC cache) stay.
    """
    have = subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=root, capture_output=True)
    if have.returncode != 0:
        _run(["git", "fetch", "--quiet", "--all"], root, log, "git fetch")
        have = subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=root, capture_output=True)
        if have.returncode != 0:
            raise PoolStageError(
                f"Commit {rev} is not in the worker's clone {root} nor in its git remotes: push it where the "
                "workers fetch from (the clone's `origin`)."
            )
    _run(["git", "checkout", "--quiet", "--force", "--detach", rev], root, log, "git checkout")


def read_lock(root: Path) -> dict[str, Any]:
    path = root / LOCK_FILE
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return data or {"schema": "2.0", "stages": {}}


def merge_lock_entries(root: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``{stage: dvc.lock entry}`` into the clone's ``dvc.lock`` (replacing the stages' committed entries)."""
    if not entries:
        return
    lock = read_lock(root)
    lock.setdefault("stages", {}).update({name: dict(entry) for name, entry in entries.items()})
    (root / LOCK_FILE).write_text(yaml.safe_dump(lock, sort_keys=False))


def lock_entry(root: Path, stage: str) -> dict[str, Any]:
    """The stage's entry in the clone's ``dvc.lock`` (after ``dvc repro``)."""
    entry = read_lock(root).get("stages", {}).get(stage)
    if entry is None:
        raise PoolStageError(f"{stage} has no entry in {root / LOCK_FILE} after dvc repro")
    return entry


def pull_stages(root: Path, stages: Iterable[str], log: Log = logger) -> None:
    """``dvc pull <stages>``: the cached outputs of these stages, by the hashes in the clone's ``dvc.lock``."""
    stages = list(stages)
    if stages:
        _dvc(root, ["pull", *stages], log, "dvc pull")


def pull_run_cache(root: Path, log: Log = logger) -> None:
    _dvc(root, ["pull", "--run-cache", "--allow-missing"], log, "dvc pull --run-cache")


def push_stage(root: Path, stage: str, log: Log = logger) -> None:
    """``dvc push <stage>``, ``dvc push --run-cache``, and the objects of the stage's uncached outputs.

    DVC 3.67.1's ``push --run-cache`` sends only the run-cache entries, not the objects of outputs kept out of the
    cache (``dvc push`` skips those), although ``dvc repro --pull`` restores a run-cached stage by pulling exactly
    those objects (``dvc/stage/cache.py::restore``). So they are pushed here, the way restore pulls them: the used
    objects of the stage rebuilt from its lock entry with every output cached (``StageCache._create_stage``).
    """
    _dvc(root, ["push", stage], log, "dvc push")
    _dvc(root, ["push", "--run-cache"], log, "dvc push --run-cache")
    from dvc.repo import Repo
    from dvc.stage.serialize import to_single_stage_lockfile

    from pipeline.orchestrate.graph import find_stage

    # StageCache._create_stage resolves "dvc.yaml" against the working directory: work from the clone's root.
    with contextlib.chdir(root), Repo(os.fspath(root)) as repo:
        target = find_stage(repo, stage)
        if not any(not out.use_cache and not out.persist for out in target.outs):
            return
        if any(not out.use_cache and not (out.is_metric or out.is_plot) for out in target.outs):
            # DVC saves no run-cache entry for such a stage (dvc/stage/__init__.py::Stage.run), so its uncached
            # outputs were never committed and nothing can restore them: the submitting side reruns it.
            log.warning("[%s] has uncached outputs that are neither metrics nor plots: DVC keeps no run cache of it",
                        stage)
            return
        cached = repo.stage_cache._create_stage(to_single_stage_lockfile(target), wdir=target.wdir)
        pushed = 0
        for objs in cached.get_used_objs().values():
            pushed += len(repo.cloud.push(objs).transferred)
    log.info("[%s] pushed %d object(s) of its uncached outputs (for run-cache restores)", stage, pushed)


def restore_uncached(root: Path, stage: str, log: Log = logger) -> bool:
    """Check out the stage's uncached, non-persisted outputs (metrics, plots) as its ``dvc.lock`` entry records them,
    pulling their objects (which :func:`push_stage` sent) from the remote; False when DVC cannot (nothing pushed).

    ``dvc repro --pull`` is no substitute: it finds a stage whose uncached metrics are missing "up to date" and
    restores nothing. This is DVC's own run-cache restore (``StageCache.restore``) fed with the lock entry.
    """
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError

    from pipeline.orchestrate.graph import find_stage

    with contextlib.chdir(root), Repo(os.fspath(root)) as repo:
        target = find_stage(repo, stage)
        try:
            with repo.lock:  # what `dvc repro` holds around it (the checkout asserts it)
                repo.stage_cache.restore(target, pull=True)
        except RunCacheNotFoundError:
            return False
        missing = [out.def_path for out in target.outs if not out.persist and not Path(out.fs_path).exists()]
    if missing:
        log.warning("[%s] restored without %s", stage, ", ".join(missing))
        return False
    log.info("[%s] restored its uncached outputs from the remote", stage)
    return True


def prepare_stage(
    root: Path,
    rev: str,
    overrides: list[str],
    upstream_locks: Mapping[str, Mapping[str, Any]],
    pull: Iterable[str],
    log: Log = logger,
) -> None:
    """Steps 1-2 of a pool stage: checkout, compose params, upstream lock entries, ``dvc pull`` of ``pull``."""
    checkout_revision(root, rev, log)
    apply_overrides(root, list(overrides))
    merge_lock_entries(root, upstream_locks)
    pull_stages(root, pull, log)


def collect_outputs(worktree: Path, locks: Mapping[str, Mapping[str, Any]], log: Log = logger) -> None:
    """Bring a pool run's record into the submitting side's worktree, for ``dvc exp save``.

    The workers' ``dvc.lock`` entries ``locks`` are written into the worktree's ``dvc.lock``; the cached outputs are
    pulled from the DVC remote (into the workspace's cache, which the worktree shares); outputs kept out of the cache
    but not ``persist`` (the reports and metrics ``dvc exp show`` reads) are checked out as the lock entries record
    them, from the objects the workers pushed (:func:`restore_uncached`), and only rerun here when that fails.
    """
    from dvc.repo import Repo

    from pipeline.orchestrate.graph import find_stage

    merge_lock_entries(worktree, locks)
    pull_run_cache(worktree, log)
    pull_stages(worktree, list(locks), log)
    with Repo(os.fspath(worktree)) as repo:
        restore = [name for name in locks
                   if any(not out.persist and not out.use_cache for out in find_stage(repo, name).outs)]
    log.info("Restoring the uncached outputs of %s from the remote", restore)
    for name in restore:
        if restore_uncached(worktree, name, log):
            continue
        status = run_stage(name, worktree, pull=True, force=True, log=log)
        log.warning("[%s] could not be restored from what the workers pushed: it %s on the submitting side", name,
                    status)
