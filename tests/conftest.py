"""Shared fixtures: an offline, isolated environment; a real GCS emulator; stores on every backend.

Environment is set at import, before prefect, gcsfs or the hub libraries are imported by any test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.prefect_server import free_port, wait_for_port

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="llm-trm-tests-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "WANDB_DIR": str(_SESSION_TMP / "wandb"),
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "PREFECT_HOME": str(_SESSION_TMP / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(_SESSION_TMP / "prefect-results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.pop("PREFECT_API_URL", None)
# The converted SmolLM2 cache is shared across test sessions on one machine (it takes ~20 s to build).
os.environ.setdefault("LLM_TRM_CACHE_DIR", str(Path.home() / ".cache" / "llm-trm"))

REPO = Path(__file__).resolve().parent.parent
GCS_BUCKET = "llm-trm-test"


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """A real local GCS emulator (gcp-storage-emulator) on 127.0.0.1; yields its endpoint URL."""
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", GCS_BUCKET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, "the GCS emulator")
        endpoint = f"http://127.0.0.1:{port}"
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield endpoint
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(params=["file", "memory", "gs"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store root on each backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    if request.param == "memory":
        return f"memory://store-{uuid.uuid4().hex[:8]}"
    request.getfixturevalue("gcs_emulator")
    return f"gs://{GCS_BUCKET}/store-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One real Prefect server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
