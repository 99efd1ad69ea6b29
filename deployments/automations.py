"""Install the two automations that make preempted runs resume by themselves (idempotent).

    ./run python deployments/automations.py [--heartbeat-window 540]

1. `llm-trm-crash-zombie-runs`: a flow run that stops sending heartbeats (its machine vanished with its
   worker, so nobody reported the crash) is marked Crashed. Workers set PREFECT_FLOWS_HEARTBEAT_FREQUENCY
   (60 s in prefect.yaml); the window must be a few heartbeats long (default 300 s).
2. `llm-trm-resume-crashed-runs`: a Crashed run of a deployment tagged `llm-trm` is set to AwaitingRetry,
   so a worker picks the same flow run up again: finished stages come back cached, the running stage
   resumes from its checkpoint. The flow itself bounds its attempts (tasks/attempts.py): failures by
   runtime.max_flow_attempts, infrastructure restarts by runtime.max_infra_restarts (then it ends Failed,
   which this automation leaves alone), so a run that always crashes stops.
"""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta
from typing import cast

from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
from prefect.client.schemas.objects import StateType
from prefect.events.schemas.events import ResourceSpecification

logger = logging.getLogger("llm_trm.automations")

ZOMBIE = "llm-trm-crash-zombie-runs"
RESUME = "llm-trm-resume-crashed-runs"
TAG = "llm-trm"
OUR_RUNS = ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"})


def automations(heartbeat_window: float) -> list[Automation]:
    zombie = Automation(
        name=ZOMBIE,
        description="Mark flow runs Crashed when their heartbeats stop (machine lost with its worker).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_window),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat: worker or machine presumed lost")],
    )
    resume = Automation(
        name=RESUME,
        description="Reschedule Crashed llm-trm runs (same flow run: cached stages skip, training resumes).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED, name="AwaitingRetry", message="Resumed after a crash (llm-trm automation)"
            )
        ],
    )
    return [zombie, resume]


def install(heartbeat_window: float = 300.0) -> list[Automation]:
    """Create (or replace) both automations on the current Prefect API; returns them as created."""
    created = []
    for automation in automations(heartbeat_window):
        try:
            existing = cast(Automation, Automation.read(name=automation.name))
            existing.delete()
            logger.info("replacing automation %s", automation.name)
        except ValueError:
            pass
        created.append(cast(Automation, automation.create()))
        logger.info("created automation %s", automation.name)
    return created


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heartbeat-window", type=float, default=300.0, help="seconds without heartbeat = lost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for automation in install(args.heartbeat_window):
        logger.info("%s: %s", automation.name, automation.id)


if __name__ == "__main__":
    main()
