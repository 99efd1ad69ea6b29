"""Fail fast when a hub model or dataset is asked for on a machine that cannot reach the hub.

Without this, `datasets` and `huggingface_hub` retry for ~20 s before failing.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from llm_trm_core.errors import HubUnavailableError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_by_env() -> str | None:
    """Name of the environment variable that puts the hub libraries offline, if one is set."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


@functools.cache
def _endpoint_reachable(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    if offline_by_env():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    return _endpoint_reachable(url.hostname or "huggingface.co", port, timeout)


def require_hub(what: str, offline_alternative: str) -> None:
    """Raise HubUnavailableError at once if the hub cannot be reached."""
    if hub_reachable():
        return
    var = offline_by_env()
    reason = f"{var} is set" if var else "the Hugging Face hub cannot be reached from this machine"
    raise HubUnavailableError(
        f"{what} needs the Hugging Face hub, but {reason}. Offline alternative: {offline_alternative}"
    )


def in_local_hub_cache(repo_id: str, filename: str = "config.json", revision: str | None = None) -> bool:
    """Whether `filename` of hub repo `repo_id` is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # HFValidationError: not a repo id (e.g. a path)
        return False
    return isinstance(found, str)
