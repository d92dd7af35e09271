"""Critical-path priority of ready stages (pipeline/orchestrate/priority.py) against hand-computed bottom levels."""

from __future__ import annotations

import concurrent.futures
import json
import statistics

import pytest

from pipeline.orchestrate.execution import run_graph
from pipeline.orchestrate.priority import (
    KIND_WEIGHTS,
    STAGE_TIMES,
    critical_path,
    read_stage_times,
    record_stage_time,
    stage_costs,
)

#  dataset ─┬─ teacher@a ── student@s ── evaluate
#           ├─ teacher@b ───────────────┘
#           └─ teacher@c ───────────────┘
GRAPH = {"dataset": [], "teacher@a": ["dataset"], "teacher@b": ["dataset"], "teacher@c": ["dataset"],
         "student@s": ["teacher@a"], "evaluate": ["teacher@b", "teacher@c", "student@s"]}


def test_bottom_levels_by_hand():
    costs = {"dataset": 1, "teacher@a": 2, "teacher@b": 5, "teacher@c": 3, "student@s": 4, "evaluate": 1}
    # bottom levels: evaluate 1, student 5, teacher@a 7, teacher@b 6, teacher@c 4, dataset 8
    assert critical_path(GRAPH, costs) == ["dataset", "teacher@a", "teacher@b", "student@s", "teacher@c", "evaluate"]
    # equal levels keep graph order
    assert critical_path({"x": [], "y": [], "z": []}, {}) == ["x", "y", "z"]


def test_costs_recorded_borrowed_from_the_primary_or_by_kind():
    graph = {"teacher@ce": [], "teacher_seed@ce-2": [], "upper_bound_seed@1": [], "student@x": [], "index@ce": []}
    times = {"teacher@ce": 30.0, "upper_bound": 50.0}
    costs = stage_costs(graph, times)
    assert costs["teacher@ce"] == 30.0 and costs["teacher_seed@ce-2"] == 30.0 and costs["upper_bound_seed@1"] == 50.0
    unit = 40.0 / statistics.median(KIND_WEIGHTS.values())  # the median of 30 and 50, per median weight
    assert costs["student@x"] == pytest.approx(unit * KIND_WEIGHTS["student"])
    assert costs["index@ce"] == pytest.approx(unit * KIND_WEIGHTS["index"])
    assert stage_costs({"student@x": []}, {}) == {"student@x": KIND_WEIGHTS["student"]}  # nothing recorded yet


def test_recorded_times_round_trip(tmp_path):
    assert read_stage_times(tmp_path) == {}
    record_stage_time(tmp_path, "teacher@ce", 12.345)
    record_stage_time(tmp_path, "dataset", 1.0)
    assert read_stage_times(tmp_path) == {"teacher@ce": 12.35, "dataset": 1.0}
    (tmp_path / STAGE_TIMES).write_text("not json")
    assert read_stage_times(tmp_path) == {}  # unreadable: no priority information, never an error
    (tmp_path / STAGE_TIMES).write_text(json.dumps({"a": "x", "b": 2}))
    assert read_stage_times(tmp_path) == {"b": 2.0}


def test_run_graph_starts_ready_stages_by_priority():
    """One slot: after ``dataset``, the teacher on the longest path starts first, not the first in graph order."""
    started: list[str] = []

    def submit(name, upstream):
        started.append(name)
        fut = concurrent.futures.Future()
        fut.set_result(name)
        return fut

    costs = {"dataset": 1, "teacher@a": 2, "teacher@b": 5, "teacher@c": 3, "student@s": 4, "evaluate": 1}
    order = critical_path(GRAPH, costs)
    run_graph(GRAPH, submit, lambda futures: iter(futures), 1, order)
    assert started == ["dataset", "teacher@a", "teacher@b", "student@s", "teacher@c", "evaluate"]
    run_graph(GRAPH, submit, lambda futures: iter(futures), 1)  # without a priority: graph order
    assert started[6:] == list(GRAPH)
    with pytest.raises(ValueError, match="priority must list every stage"):
        run_graph(GRAPH, submit, lambda futures: iter(futures), 1, order[:-1])
