"""Retry only what a retry can fix: storage/network hiccups, never config or data errors."""

from __future__ import annotations

from typing import Any

from llm_trm_core.errors import TransientError, UserError

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (TransientError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return False
    return isinstance(exc, _TRANSIENT_TYPES)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for Prefect tasks."""
    try:
        state.result()
    except BaseException as exc:  # the state's exception is re-raised by result()
        return is_transient(exc)
    return False


# Options of every stage task: two retries, for transient failures only.
RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": retry_transient}
