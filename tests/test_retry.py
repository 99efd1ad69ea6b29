"""Retries apply to transient failures only, never to config or data errors."""

from __future__ import annotations

from llm_trm_core.errors import ArtifactCorruptError, ConfigError, TransientError, UserError
from tasks.retry import is_transient, retry_transient


class _State:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self) -> None:
        raise self.exc


def test_only_transient_errors_are_retried() -> None:
    assert is_transient(TransientError("gcs 503"))
    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    for exc in (ConfigError("bad key"), UserError("empty corpus"), ArtifactCorruptError("size"), ValueError("x")):
        assert not is_transient(exc)
    assert retry_transient(None, None, _State(TransientError("x"))) is True
    assert retry_transient(None, None, _State(ConfigError("x"))) is False
