"""Where an artifact came from: package version and git commit."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import llm_trm_core


def package_version() -> str:
    return llm_trm_core.__version__


@functools.cache
def git_sha() -> str | None:
    """Commit of the source tree (env LLM_TRM_GIT_SHA wins, e.g. inside a Docker image)."""
    if sha := os.environ.get("LLM_TRM_GIT_SHA"):
        return sha
    repo = Path(llm_trm_core.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return f"{sha}-dirty" if dirty else sha
