"""The stage graph of a DVC repository, read from DVC itself so the DAG is never defined twice.

DVC has no public stage or DAG API (ECOSYSTEM.md §3.3), so this reads the resolved graph (``foreach``/``matrix``
expanded) from ``dvc.repo.Repo(root).index.graph``, an internal networkx graph: dvc is pinned to 3.67.1 and
``tests/pipeline/test_flow.py`` guards it against ``dvc stage list``. In that graph an edge u→v means "u depends on v"
(ECOSYSTEM.md §1.6), so it is reversed before the topological sort.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)


def _stage_name(stage: Any) -> str:
    """DVC's ``stage.addressing`` as seen from the repo root (``addressing`` itself is relative to the CWD)."""
    path = stage.path_in_repo.replace(os.sep, "/")
    return stage.name if path == "dvc.yaml" else f"{path}:{stage.name}"


def _graph(repo: Any) -> dict[str, list[str]]:
    import networkx as nx

    graph = repo.index.graph
    stages = [s for s in graph.nodes if getattr(s, "cmd", None)]
    upstream = {
        _stage_name(s): sorted(_stage_name(u) for u in graph.successors(s) if getattr(u, "cmd", None)) for s in stages
    }
    # Upstream first; ties broken by name so runs are reproducible.
    order = [_stage_name(s) for s in nx.lexicographical_topological_sort(graph.reverse(copy=True), key=_stage_name)]
    return {name: upstream[name] for name in order if name in upstream}


def stage_graph(repo_root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Every pipeline stage of the DVC repo → the stages it depends on directly (``foreach``/``matrix`` expanded).

    Nodes without a ``cmd`` (``.dvc`` files of imported data) are dropped.

    Args:
        repo_root: root of the DVC repository.

    Returns:
        ``{stage name (DVC's addressing from the repo root): sorted upstream stage names}``, upstream first.
    """
    from dvc.repo import Repo

    with Repo(os.fspath(repo_root)) as repo:
        return _graph(repo)


def stages_to_run(
    repo_root: str | os.PathLike[str], targets: Iterable[str] = ()
) -> tuple[dict[str, list[str]], set[str] | None]:
    """The graph of ``targets`` (:func:`select_stages`) and which of its stages need a ``dvc repro`` process.

    One pass over the graph in this process, upstream first: a stage needs one when an upstream stage does (its
    inputs may change; if they come out identical, DVC skips it then) or when DVC's own test says it changed
    (``Stage.changed()``, what ``dvc repro`` asks before running a stage: command, deps, params or outputs, a missing
    output included, which the run cache may restore). ``Stage.changed`` is internal to DVC (pinned to 3.67.1;
    ``tests/pipeline/test_orchestrate_noop.py`` guards it).

    Returns:
        ``(graph, stages to run)``; ``None`` instead of the set when DVC could not be asked (a lock held by another
        DVC process, an unexpected error): then every stage should be handed to ``dvc repro``, which decides.
    """
    from dvc.repo import Repo

    with Repo(os.fspath(repo_root)) as repo:
        graph = select_stages(_graph(repo), targets)
        try:
            stages = {_stage_name(s): s for s in repo.index.stages if getattr(s, "cmd", None)}
            run: set[str] = set()
            with repo.lock:
                for name, ups in graph.items():
                    if any(up in run for up in ups) or stages[name].changed():
                        run.add(name)
        except Exception as exc:  # noqa: BLE001 - any failure means: let dvc repro decide, as before
            logger.warning("Could not check which stages changed (%s: %s); every stage goes to dvc repro",
                           type(exc).__name__, exc)
            return graph, None
    return graph, run


def find_stage(repo: Any, name: str) -> Any:
    """The stage object named ``name`` (as :func:`stage_graph` names it) in an open ``dvc.repo.Repo``.

    Unlike ``repo.stage.collect(name)``, independent of the current working directory.
    """
    for stage in repo.index.stages:
        if getattr(stage, "cmd", None) and _stage_name(stage) == name:
            return stage
    raise ValueError(f"No stage {name!r} in {repo.root_dir}")


def select_stages(graph: dict[str, list[str]], targets: Iterable[str]) -> dict[str, list[str]]:
    """Restrict ``graph`` to ``targets`` and everything upstream of them (all stages when ``targets`` is empty).

    A target is a stage name (``teacher@r32``) or a ``foreach``/``matrix`` group (``teacher`` = every ``teacher@*``).

    Raises:
        ValueError: a target names no stage; the message lists the valid names.
    """
    targets = list(targets)
    if not targets:
        return dict(graph)
    wanted: set[str] = set()
    for target in targets:
        matched = [name for name in graph if name == target or name.split("@", 1)[0] == target]
        if not matched:
            raise ValueError(f"Unknown target {target!r}; valid stages: {', '.join(graph)}")
        wanted.update(matched)
    todo = list(wanted)
    while todo:
        for up in graph[todo.pop()]:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)
    return {name: ups for name, ups in graph.items() if name in wanted}


def upstream_closure(graph: Mapping[str, Sequence[str]], name: str) -> list[str]:
    """Every stage ``name`` depends on, directly or not, in ``graph`` order."""
    seen: set[str] = set()
    todo = list(graph[name])
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo.extend(graph[up])
    return [n for n in graph if n in seen]
