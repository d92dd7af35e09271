"""The automations that find the lost runs of the stage deployment (:mod:`pipeline.flow.pool`): Prefect's own mechanism.

A self-hosted Prefect server marks no run of a lost worker ``Crashed`` by itself (Prefect Cloud's managed "zombie
flow" detection does not exist there), so :func:`pipeline.flow.pool.deploy_stage` creates two proactive automations,
restricted to the stage deployment, each with one action: ``ChangeFlowRunState`` to ``CRASHED`` with a message that
says why.

* **no heartbeat** (:func:`crash_automation`, Prefect's "detect zombie flows" recipe): after a
  ``prefect.flow-run.heartbeat``, another heartbeat or a final state must follow within ``crash_after_s``. Catches a
  run whose worker died while it ran.
* **taken, never started** (:func:`pending_automation`): after ``prefect.flow-run.Pending`` (the event the server
  emits when a worker takes a run; state-change events are named after the state's *name*,
  ``prefect.server.models.events.flow_run_state_change_event``), ``prefect.flow-run.Running`` (or a final state, or
  ``Cancelling``) must follow within ``pending_after_s``. Catches a run whose worker died between taking it and
  starting its process: such a run never sends a heartbeat, so the first automation never sees it. Prefect 3.8's
  worker proposes ``Pending`` and then a ``Pending`` state named ``Submitting`` (a runner may propose ``Submitting``
  alone), so ``prefect.flow-run.Submitting`` opens the window too; a second opening event leaves an open window as
  it is (``ensure_bucket``), so the window counts from the first.

The server evaluates proactive triggers every 5 s (``PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY``), so a run is
marked ``Crashed`` 0-5 s after its window ends. :func:`ensure_automation` keeps an unchanged automation and replaces a
changed one: setting them up again is idempotent.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

logger = logging.getLogger(__name__)

CRASH_AFTER_S = 90  # no heartbeat for this long: Crashed (Prefect's recipe: 3 missed heartbeats of 30 s)
# A process worker starts a run it took in seconds (it proposes Pending, then spawns the flow-run process, which
# imports the flow and proposes Running); 120 s leaves room for a loaded host's slow imports (a torch import on a
# busy node takes tens of seconds) and still finds a lost one in about 2 minutes, sooner than NO_WORKER_S.
PENDING_AFTER_S = 120
MIN_WINDOW_S = 10  # Prefect's minimum `within` of a proactive trigger
CRASH_AUTOMATION = "longtail: crash stage runs without heartbeats"
CRASH_MESSAGE = "no heartbeat for {s} s: its worker was lost"
PENDING_AUTOMATION = "longtail: crash stage runs taken by a worker but not started"
PENDING_MESSAGE = "taken by a worker but not started within {s} s: its worker was lost"
FINAL_EVENTS = frozenset(f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed"))


def _trigger(deployment_id: UUID, after: set[str], expect: set[str], within_s: int) -> EventTrigger:
    """A proactive trigger per flow run of the deployment ``deployment_id``: after one of ``after``, one of
    ``expect`` must follow within ``within_s``."""
    return EventTrigger(
        after=after,
        expect=expect,
        match={"prefect.resource.id": ["prefect.flow-run.*"]},
        match_related={
            "prefect.resource.role": "deployment",
            "prefect.resource.id": f"prefect.deployment.{deployment_id}",
        },
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=within_s),
    )


def crash_automation(deployment_id: UUID, crash_after_s: int = CRASH_AFTER_S) -> Automation:
    """Crashed when no heartbeat (nor a final state) follows a stage run's heartbeat within ``crash_after_s``."""
    return Automation(
        name=CRASH_AUTOMATION,
        description="Marks a longtail-stage flow run Crashed when its heartbeats stop (a lost worker); the pipeline "
        "run then submits the stage again (pipeline/flow/pool.py).",
        trigger=_trigger(
            deployment_id, {"prefect.flow-run.heartbeat"}, {"prefect.flow-run.heartbeat", *FINAL_EVENTS}, crash_after_s
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=CRASH_MESSAGE.format(s=crash_after_s))],
    )


def pending_automation(deployment_id: UUID, pending_after_s: int = PENDING_AFTER_S) -> Automation:
    """Crashed when a stage run a worker took (``Pending``) is not ``Running`` (nor final, nor ``Cancelling``)
    within ``pending_after_s``: its worker died before the run's process started, so no heartbeat ever comes."""
    return Automation(
        name=PENDING_AUTOMATION,
        description="Marks a longtail-stage flow run Crashed when a worker took it but never started it (the worker "
        "was lost before the run's process started); the pipeline run then submits the stage again "
        "(pipeline/flow/pool.py).",
        trigger=_trigger(
            deployment_id,
            {"prefect.flow-run.Pending", "prefect.flow-run.Submitting"},
            {"prefect.flow-run.Running", "prefect.flow-run.Cancelling", *FINAL_EVENTS},
            pending_after_s,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=PENDING_MESSAGE.format(s=pending_after_s))],
    )


def ensure_automation(wanted: Automation) -> UUID:
    """Create ``wanted``, or keep the enabled automation of its name with the same trigger and actions; any other of
    that name is deleted (a changed window replaces it). Idempotent."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(wanted.name)
        keep = [a for a in existing if a.trigger == wanted.trigger and a.actions == wanted.actions and a.enabled]
        for automation in existing:
            if not keep or automation.id != keep[0].id:
                client.delete_automation(automation.id)
    if keep:
        return keep[0].id
    created = wanted.create()
    logger.info("Created automation %r (%s)", wanted.name, wanted.trigger.describe_for_cli().strip())
    return created.id


def ensure_stage_automations(
    deployment_id: UUID, crash_after_s: int = CRASH_AFTER_S, pending_after_s: int = PENDING_AFTER_S
) -> list[UUID]:
    """Both automations of the stage deployment ``deployment_id`` (:func:`crash_automation`,
    :func:`pending_automation`), created or kept (:func:`ensure_automation`). Returns their ids."""
    return [
        ensure_automation(crash_automation(deployment_id, crash_after_s)),
        ensure_automation(pending_automation(deployment_id, pending_after_s)),
    ]
