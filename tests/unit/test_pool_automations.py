"""The automations of the stage deployment (pipeline/flow/automations.py), built and checked offline.

The events are made by the server's own code (``flow_run_state_change_event``, the function that emits a flow run's
state-change event) and matched with the server's own trigger model, so a wrong event name or a filter that misses the
deployment fails here, without a Prefect server.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace
from uuid import UUID, uuid4

import pytest

from pipeline.flow import automations as auto
from pipeline.flow.pool import _describe, check_windows

FINAL = {"Completed", "Failed", "Cancelled", "Crashed"}


def _server_trigger(automation):
    from prefect.server.events.schemas.automations import EventTrigger

    return EventTrigger.model_validate(automation.trigger.model_dump())


def _state_event(monkeypatch, state_name: str, deployment_id: UUID, flow_run_id: UUID):
    """The event the server emits when a flow run of ``deployment_id`` enters the state ``state_name``."""
    from prefect.server.models import events
    from prefect.server.schemas import states

    async def related(session, flow_run):  # the deployment, as the server reads it from the database
        return [
            {
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                "prefect.resource.role": "deployment",
                "prefect.resource.name": "run-stage",
            }
        ]

    monkeypatch.setattr(events, "_flow_run_related_resources_from_orm", related)
    validated = getattr(states, state_name)()  # Pending(), Running(), ...: the server's own state constructors
    event = asyncio.run(
        events.flow_run_state_change_event(
            session=None,
            occurred=validated.timestamp,
            flow_run=SimpleNamespace(id=flow_run_id, name="teacher@ce", run_count=0),
            initial_state_id=None,
            initial_state=None,
            validated_state_id=uuid4(),
            validated_state=validated,
        )
    )
    from prefect.server.events.schemas.events import ReceivedEvent

    return ReceivedEvent.model_validate(event.model_dump())


def test_pending_automation_crashes_a_taken_run_that_never_starts(monkeypatch) -> None:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import Posture

    deployment, other, run = uuid4(), uuid4(), uuid4()
    automation = auto.pending_automation(deployment, 20)
    trigger = automation.trigger
    assert automation.name == auto.PENDING_AUTOMATION
    assert trigger.after == {"prefect.flow-run.Pending", "prefect.flow-run.Submitting"}
    assert trigger.expect == {f"prefect.flow-run.{s}" for s in ("Running", "Cancelling", *FINAL)}
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert trigger.within == timedelta(seconds=20)
    assert trigger.for_each == {"prefect.resource.id"}  # one window per flow run
    assert automation.actions == [
        ChangeFlowRunState(
            state=StateType.CRASHED, message="taken by a worker but not started within 20 s: its worker was lost"
        )
    ]

    # What the server does with the events of a run of this deployment: Pending opens the window, Running (or a
    # final state, or Cancelling) closes it; no expected event at all (count 0) fires the action.
    server = _server_trigger(automation)
    pending = _state_event(monkeypatch, "Pending", deployment, run)
    assert pending.event == "prefect.flow-run.Pending"
    assert server.covers(pending) and server.starts_after(pending.event) and not server.expects(pending.event)
    assert server.bucketing_key(pending) == (f"prefect.flow-run.{run}",)
    submitting = _state_event(monkeypatch, "Submitting", deployment, run)  # the worker's next proposal
    assert submitting.event == "prefect.flow-run.Submitting"
    assert server.covers(submitting) and server.starts_after(submitting.event)
    for name in ("Running", "Cancelling", *FINAL):
        closing = _state_event(monkeypatch, name, deployment, run)
        assert closing.event == f"prefect.flow-run.{name}"
        assert server.covers(closing) and server.expects(closing.event), name
    assert not server.expects("prefect.flow-run.heartbeat")
    assert server.meets_threshold(0) and not server.meets_threshold(1)
    # Another deployment's runs are not its business.
    assert not server.covers(_state_event(monkeypatch, "Pending", other, run))


def test_crash_automation_is_prefects_heartbeat_recipe_for_the_deployment(monkeypatch) -> None:
    from prefect.events.schemas.automations import Posture

    deployment, run = uuid4(), uuid4()
    automation = auto.crash_automation(deployment, 45)
    trigger = automation.trigger
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL)}
    assert trigger.posture == Posture.Proactive and trigger.within == timedelta(seconds=45)
    assert automation.actions[0].message == "no heartbeat for 45 s: its worker was lost"
    server = _server_trigger(automation)
    assert server.covers(_state_event(monkeypatch, "Crashed", deployment, run))
    assert not server.covers(_state_event(monkeypatch, "Pending", deployment, run))


class _FakeClient:
    """The two calls :func:`ensure_automation` makes, on an in-memory list of automations."""

    def __init__(self, store: list) -> None:
        self.store = store

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read_automations_by_name(self, name: str) -> list:
        return [a for a in self.store if a.name == name]

    def delete_automation(self, automation_id: UUID) -> None:
        self.store[:] = [a for a in self.store if a.id != automation_id]


def test_ensure_keeps_an_unchanged_automation_and_replaces_a_changed_one(monkeypatch) -> None:
    import prefect.client.orchestration
    from prefect.automations import Automation

    store: list = []

    def create(self):
        self.id = uuid4()
        store.append(self.model_copy())
        return self

    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: _FakeClient(store))
    monkeypatch.setattr(Automation, "create", create)
    deployment = uuid4()
    crash, pending = auto.ensure_stage_automations(deployment, 90, 120)
    assert auto.ensure_stage_automations(deployment, 90, 120) == [crash, pending]  # unchanged: kept
    assert len(store) == 2
    crash2, pending2 = auto.ensure_stage_automations(deployment, 90, 60)  # a changed window: replaced
    assert crash2 == crash and pending2 != pending
    assert sorted(a.name for a in store) == sorted([auto.CRASH_AUTOMATION, auto.PENDING_AUTOMATION])
    assert next(a for a in store if a.id == pending2).trigger.within == timedelta(seconds=60)


def test_bad_windows_fail_with_one_line() -> None:
    check_windows(30, 90, auto.PENDING_AFTER_S)
    with pytest.raises(ValueError, match=r"^pending_after_s=0 must be >= 10 \(Prefect's shortest proactive window\)$"):
        check_windows(30, 90, 0)
    with pytest.raises(ValueError, match="crash_after_s=30 must exceed heartbeat_s=30"):
        check_windows(30, 30, 120)


def test_the_cli_refuses_a_bad_pending_window_before_touching_a_server(monkeypatch, capsys) -> None:
    from pipeline.flow import main

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: it must not get that far
    with pytest.raises(SystemExit) as exc:
        main(["deploy-stage", "--pending-after", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: pending_after_s=5 must be >= 10 (Prefect's shortest proactive window)"), err
    monkeypatch.setenv("LONGTAIL_PENDING_AFTER_S", "soon")
    with pytest.raises(SystemExit):
        main(["deploy-stage"])
    assert "argument --pending-after: invalid int value: 'soon'" in capsys.readouterr().err


def test_a_run_lost_while_pending_is_described_in_the_resubmission_line() -> None:
    from prefect.states import Crashed

    state = Crashed(message=auto.PENDING_MESSAGE.format(s=120))
    assert _describe(state) == "crashed (taken by a worker but not started within 120 s: its worker was lost)"
