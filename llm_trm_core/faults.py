"""Fault injection for tests: a process kills itself (SIGKILL) at a named point, as a preempted VM dies.

    LLM_TRM_FAULT_KILL=checkpoint:8        after checkpoint 8 of any stage is complete
    LLM_TRM_FAULT_KILL=trm-checkpoint:2    after checkpoint 2 of the trm stage is complete
    LLM_TRM_FAULT_KILL=datagen-part:2      after the 2nd generation part of a shard is published
Unset (the default), nothing happens. With LLM_TRM_FAULT_ONCE=<path> as well, the kill happens only if
<path> does not exist yet (it is created first): a retried run with the same environment (a Prefect
retry of the same flow run) then goes through, as after a real preemption.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

FAULT_ENV = "LLM_TRM_FAULT_KILL"
ONCE_ENV = "LLM_TRM_FAULT_ONCE"


def kill_if_requested(point: str, value: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{value}":
        if once := os.environ.get(ONCE_ENV):
            try:
                with open(once, "x"):
                    pass
            except FileExistsError:
                return
        logger.warning("%s=%s:%d: killing this process (fault injection)", FAULT_ENV, point, value)
        os.kill(os.getpid(), signal.SIGKILL)
