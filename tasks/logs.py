"""Route `llm_trm_core`'s standard logging into the Prefect run's log (UI and API)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging.handlers import APILogHandler

CORE_LOGGER = "llm_trm_core"


@contextmanager
def core_logs_to_prefect(level: int = logging.INFO) -> Iterator[None]:
    """While inside a flow or task run, send llm_trm_core records to Prefect's API log handler."""
    logger = logging.getLogger(CORE_LOGGER)
    handler = APILogHandler()
    handler.setLevel(level)
    previous = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
