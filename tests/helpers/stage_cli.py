"""`llm-trm stage <name>` on the tiny preset in a child process (optionally SIGKILLed at a fault point), and
the file digests of what it committed: the pieces of the kill-and-resume tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llm_trm_core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]


def run_stage(
    name: str, root: str | Path, *overrides: str, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m flows.cli stage name --preset tiny --store root overrides...`; `fault`: LLM_TRM_FAULT_KILL
    (llm_trm_core/faults.py), else none inherited. `root`: a store URI, or a folder for a file:// store."""
    env = {k: v for k, v in os.environ.items() if k != "LLM_TRM_FAULT_KILL"}
    if fault:
        env["LLM_TRM_FAULT_KILL"] = fault
    store = root if isinstance(root, str) else f"file://{root}"
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", name, "--preset", "tiny", "--store", store, *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def file_digests(root: Path, *stages: str) -> dict[str, dict[str, str]]:
    """Every committed artifact of `stages` in the file:// store at `root`: stage/key -> file -> sha256."""
    store = ArtifactStore(f"file://{root}")
    out = {}
    for stage in stages:
        for key in store.list_keys(stage):
            manifest = store.read_manifest(stage, key)
            if manifest is not None:
                out[f"{stage}/{key}"] = {name: entry.sha256 for name, entry in manifest.files.items()}
    return out
