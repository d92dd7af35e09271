"""Where a pipeline run happens: the user's workspace, or an isolated git worktree saved as a DVC experiment.

A run with overrides must not leave them behind: applied in the workspace, they would rewrite ``params.yaml`` (and
``dvc.lock``, ``data/``) and every later ``make run`` would keep them. So such a run (and every run sent to a work
pool) happens in an **isolated worktree**:

1. the git revision is pinned: ``git rev-parse HEAD`` of the workspace, refused when tracked files are modified
   (an uncommitted change would silently not be part of the run; commit or stash it). Files that runs themselves
   write (:func:`run_written`: ``dvc.lock``, tracked stage outputs such as metrics) do not count: a local run (``make
   run``) rewrites ``dvc.lock`` whenever its results differ in a bit from the committed ones (another CPU), and that
   must not block the next run with overrides;
2. ``git worktree add --detach .dvc/tmp/runs/<name> <rev>`` (shares the object store and refs with the workspace, so
   an experiment saved there is the workspace's experiment) with the workspace's DVC cache as its cache
   (``cache.dir``; nothing is recomputed or stored twice) and ``.dvc/config.local`` (remotes, credentials). The code,
   ``conf/`` and ``params.yaml`` are the commit's; the workspace's ``dvc.lock`` (the record of the results a local
   run of that same commit left in the cache) replaces the commit's, so the stages the overrides do not touch are
   skipped rather than redone: DVC still checks every entry's dependencies (code, params, inputs) against the
   worktree's files and reruns any stage whose entry does not match them;
3. the workspace's outputs kept outside the cache (``persist``/``cache: false``: resumable checkpoints, reports) are
   copied in, as ``dvc exp run -C`` would, and the cached ones checked out, so stages the overrides do not touch are
   "didn't change, skipping" instead of rerunning;
4. the overrides are composed into the worktree's ``params.yaml`` (:func:`.overrides.apply_overrides`)
   and the stages run there;
5. :func:`save_experiment` records the result with ``dvc exp save`` (params, ``dvc.lock``, and the uncached metrics
   and plots files, which git ignores under ``data/``), so ``dvc exp show`` in the workspace lists it; the worktree
   is then removed (``git worktree remove``). The workspace's files, ``git status`` and ``params.yaml`` are untouched.

``dvc exp run --temp`` does the same isolation but reproduces the whole pipeline in one DVC process, one stage at a
time; this keeps the per-stage scheduler (parallel stages, one Prefect task per stage, work pools).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

RUNS_DIR = Path(".dvc") / "tmp" / "runs"  # ignored by git (.dvc/.gitignore) and by DVC
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")


class DirtyTreeError(RuntimeError):
    """Tracked files differ from the commit a run would pin."""


def _git(root: str | os.PathLike[str], *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _dvc(root: str | os.PathLike[str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {root}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def experiment_name(text: str) -> str:
    """A valid DVC experiment (git ref) name from a flow run name such as ``crimson-fox``."""
    name = _NAME_OK.sub("-", text).strip("-.") or "run"
    return name[:60]


def dirty_tracked_files(root: str | os.PathLike[str]) -> list[str]:
    """Tracked files modified (staged or not) relative to ``HEAD``; untracked files are not listed."""
    out = _git(root, "-c", "core.quotePath=false", "status", "--porcelain", "--untracked-files=no")
    return [line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()]


def _stage_outputs(root: str | os.PathLike[str]) -> list[str]:
    """Every declared stage output of the repository at ``root`` (paths relative to it)."""
    from dvc.repo import Repo

    with Repo(os.fspath(root)) as repo:
        base = Path(repo.root_dir)
        return sorted({Path(out.fs_path).relative_to(base).as_posix() for stage in repo.index.stages
                       for out in getattr(stage, "outs", [])})


def run_written(root: str | os.PathLike[str], files: Iterable[str]) -> list[str]:
    """The ``files`` (relative to ``root``) that pipeline runs write themselves: ``dvc.lock`` files and declared stage
    outputs (metrics, plots, reports that a repository tracks in git). They record a run's results, not its inputs."""
    files = list(files)
    rest = [f for f in files if Path(f).name != "dvc.lock"]
    outs = _stage_outputs(root) if rest else []
    under = {f for f in rest if any(f == o or f.startswith(f"{o.rstrip('/')}/") for o in outs)}
    return [f for f in files if Path(f).name == "dvc.lock" or f in under]


def pin_revision(root: str | os.PathLike[str]) -> str:
    """``git rev-parse HEAD`` of ``root``, refusing a tree whose tracked files differ from it.

    Files the runs write (:func:`run_written`: ``dvc.lock``, tracked stage outputs) may differ: a local run leaves
    them modified whenever its results differ from the committed ones, and an isolated run never reads them as input.

    Raises:
        DirtyTreeError: tracked files other than those are modified; the message lists them and says what to do.
    """
    dirty = dirty_tracked_files(root)
    if dirty:
        written = set(run_written(root, dirty))
        dirty = [f for f in dirty if f not in written]
    if dirty:
        shown = ", ".join(dirty[:10]) + (f" and {len(dirty) - 10} more" if len(dirty) > 10 else "")
        raise DirtyTreeError(
            f"An isolated run reproduces a commit plus its overrides, but tracked files differ from HEAD: {shown}. "
            "Commit (or stash) them first, or pass the change as an override (-S key=value)."
        )
    return _git(root, "rev-parse", "HEAD").strip()


def uncached_outputs(repo_root: str | os.PathLike[str]) -> list[str]:
    """Paths (relative to the repo root) of every stage output kept outside the DVC cache: ``persist`` or
    ``cache: false`` (resumable checkpoints, reports, metrics), which ``dvc checkout``/``pull`` cannot restore."""
    from dvc.repo import Repo

    paths: list[str] = []
    with Repo(os.fspath(repo_root)) as repo:
        for stage in repo.index.stages:
            for out in getattr(stage, "outs", []):
                if out.persist or not out.use_cache:
                    paths.append(Path(out.fs_path).relative_to(Path(repo.root_dir)).as_posix())
    return sorted(set(paths))


def stages_with_outputs(repo_root: str | os.PathLike[str], stages: Iterable[str]) -> list[str]:
    """The ``stages`` whose every output exists under ``repo_root``: those ``dvc exp save`` can commit.

    After a pool run the submitting side has each stage's ``dvc.lock`` entry and its cached outputs, but not the
    persisted uncached ones (the checkpoints stay in the worker's clone that trained the model); committing such a
    stage would fail on the missing path, and its lock entry, written by its worker, is already the right one.
    """
    from dvc.repo import Repo

    from pipeline.orchestrate.graph import find_stage

    keep: list[str] = []
    with Repo(os.fspath(repo_root)) as repo:
        for name in stages:
            if all(Path(out.fs_path).exists() for out in find_stage(repo, name).outs):
                keep.append(name)
    return keep


def metric_files(repo_root: str | os.PathLike[str]) -> list[str]:
    """Existing uncached metrics and plots files of the repo's stages (relative paths): what ``dvc exp show`` and
    ``dvc plots diff`` read from an experiment's commit, and what git ignores under ``data/``."""
    from dvc.repo import Repo

    files: list[str] = []
    with Repo(os.fspath(repo_root)) as repo:
        root = Path(repo.root_dir)
        for stage in repo.index.stages:
            for out in getattr(stage, "outs", []):
                path = Path(out.fs_path)
                if (out.metric or out.plot) and not out.use_cache and path.is_file():
                    files.append(path.relative_to(root).as_posix())
    return sorted(set(files))


def _copy_path(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


@contextmanager
def isolated_worktree(root: str | os.PathLike[str], rev: str, name: str) -> Iterator[Path]:
    """A detached git worktree of ``rev`` under ``<root>/.dvc/tmp/runs/<name>``, sharing ``root``'s DVC cache.

    Copies ``.dvc/config.local``, the workspace's ``dvc.lock`` when it differs from the commit's (see the module
    docstring) and the workspace's uncached outputs in, checks out the cached outputs that ``dvc.lock`` names
    (missing ones are skipped), and removes the worktree on exit (also on an error).

    Args:
        root: the user's repository root (the workspace).
        rev: the commit to check out (:func:`pin_revision`).
        name: run name (:func:`experiment_name`); the directory name.
    """
    from dvc.repo import Repo

    root = Path(root).resolve()
    path = root / RUNS_DIR / experiment_name(name)
    if path.exists():  # a leftover of a killed run with the same name
        _remove_worktree(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(root, "worktree", "add", "--detach", "--quiet", os.fspath(path), rev)
    try:
        local_config = root / ".dvc" / "config.local"
        if local_config.is_file():
            shutil.copy2(local_config, path / ".dvc" / "config.local")
        with Repo(os.fspath(root)) as repo:
            cache_dir = repo.cache.local_cache_dir
        _dvc(path, "config", "--local", "cache.dir", os.fspath(cache_dir))
        for rel in _workspace_locks(root, path):
            shutil.copy2(root / rel, path / rel)
            logger.info("Using the workspace's %s (results of a local run of the same commit)", rel)
        for rel in uncached_outputs(path):
            _copy_path(root / rel, path / rel)
        checkout = _dvc(path, "checkout", "--allow-missing", check=False)
        if checkout.returncode != 0:
            logger.info("dvc checkout in %s: %s", path, (checkout.stdout + checkout.stderr).strip()[-500:])
        logger.info("Isolated worktree %s at %s (cache %s)", path, rev[:12], cache_dir)
        yield path
    finally:
        _remove_worktree(root, path)


def _workspace_locks(root: Path, worktree: Path) -> list[str]:
    """The workspace's ``dvc.lock`` files (beside the tracked ``dvc.yaml`` files, as relative paths) that differ from
    the worktree's or that it lacks."""
    found = []
    for yaml_file in _git(root, "ls-files", "-z", "--", ":(glob)**/dvc.yaml").split("\0"):
        if not yaml_file:
            continue
        rel = Path(yaml_file).with_name("dvc.lock")
        src, dst = root / rel, worktree / rel
        if src.is_file() and not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
            found.append(rel.as_posix())
    return found


def _remove_worktree(root: Path, path: Path) -> None:
    proc = subprocess.run(["git", "worktree", "remove", "--force", os.fspath(path)], cwd=root, capture_output=True)
    if proc.returncode != 0 and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def save_experiment(
    worktree: str | os.PathLike[str], name: str, stages: Iterable[str] = (), include: Iterable[str] = ()
) -> str:
    """``dvc exp save --force -n <name> -I <uncached metrics/plots files> <stages>`` in ``worktree``; returns the name.

    ``stages`` limits what DVC commits to the stages the run reproduced (others may lack outputs in the worktree).

    The experiment's commit holds the composed ``params.yaml``, the ``dvc.lock`` of the run and its metrics, so
    ``dvc exp show`` (params and metrics), ``dvc exp diff`` and ``dvc exp apply <name>`` (+ ``dvc checkout`` /
    ``dvc pull``) work on it from the workspace.
    """
    name = experiment_name(name)
    args = ["exp", "save", "--force", "-n", name]
    for rel in [*metric_files(worktree), *include]:
        args += ["-I", rel]
    _dvc(worktree, *args, *stages)
    logger.info("Saved DVC experiment %s", name)
    return name


def stage_env(
    run_root: str | os.PathLike[str] | None, store_root: str | os.PathLike[str], tags: dict[str, str]
) -> dict[str, str]:
    """Extra environment of the stages of one run (:func:`pipeline.orchestrate.execution.run_stage`'s ``env``).

    * ``PYTHONPATH`` starts with ``run_root`` (an isolated worktree's code, not the workspace's: ``make`` exports the
      workspace on ``PYTHONPATH``);
    * ``MLFLOW_TRACKING_URI`` is the workspace's store (``store_root``) unless one is set, so the runs of a worktree
      that is removed afterwards land where ``mlflow ui`` looks;
    * ``LONGTAIL_RUN_TAGS`` carries ``tags`` (``flow_run``, ``dvc_exp``) onto every stage's MLflow run.
    """
    import json

    from pipeline.tracking import RUN_TAGS_ENV, default_tracking_uri

    env = {RUN_TAGS_ENV: json.dumps(tags, sort_keys=True), "MLFLOW_TRACKING_URI": default_tracking_uri(store_root)}
    if run_root is not None:
        inherited = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = os.fspath(run_root) + (os.pathsep + inherited if inherited else "")
    return env
