"""Whether the holder of a store lock is still alive, as Prefect knows it.

Each lock records the flow run (and its attempt) that took it. A waiter may break the lock before its
lease ends when that flow run has reached a final state (Crashed, Failed, Cancelled, Completed), or when
the holder was an earlier attempt of the waiter's own flow run (a retried run: only one attempt of a
flow run executes at a time, so the earlier one is dead). Holders on the waiter's own host are judged
by their process instead (llm_trm_core.locks), never by this.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

ENDED = {"CRASHED", "FAILED", "CANCELLED", "COMPLETED"}
_STATE_TTL_SECONDS = 5.0
_states: dict[str, tuple[float, str]] = {}  # flow run id -> (when read, state type)


def lock_owner() -> dict[str, Any]:
    """The flow run and attempt taking a lock (empty outside a flow run)."""
    run_id = flow_run.id
    if not run_id:
        return {}
    return {"flow_run_id": str(run_id), "run_count": int(flow_run.run_count or 1)}


def _state_type(run_id: str) -> str:
    now = time.monotonic()
    seen = _states.get(run_id)
    if seen is not None and now - seen[0] < _STATE_TTL_SECONDS:
        return seen[1]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)  # type: ignore[arg-type]
    state = run.state.type.value if run.state is not None else "PENDING"
    _states[run_id] = (now, state)
    return state


def lock_holder_ended(record: dict[str, Any]) -> bool:
    """True when the lock's flow run has ended, or the lock was taken by an earlier attempt of this run."""
    run_id = record.get("flow_run_id")
    if not run_id:
        return False
    mine = lock_owner()
    if mine.get("flow_run_id") == run_id:
        return int(record.get("run_count", 1)) < int(mine["run_count"])
    return _state_type(str(run_id)) in ENDED
