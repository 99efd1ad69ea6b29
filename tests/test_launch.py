"""Multi-process stages launched with torchrun as a child process that dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llm_trm_core.config import load_config
from llm_trm_core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def test_launched_stage_runs_on_two_processes_and_commits(tmp_path: Path) -> None:
    from llm_trm_core.launch import launch_stage

    root = f"file://{tmp_path / 'store'}"
    cfg = load_config("tiny", [f"store.root={root}", "compressor.solver=sgd", "compressor.max_steps=6",
                               "runtime.num_processes=2"])  # fmt: skip
    result = launch_stage("flows.cli", cfg, cfg.runtime.num_processes, timeout=600, args=("stage", "compressor"))
    assert result["world_size"] == 2
    assert ArtifactStore(root).read_manifest("compressor", result["key"]) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_die_when_the_launching_process_is_killed(tmp_path: Path) -> None:
    script = (
        "from llm_trm_core.config import load_config\n"
        "from llm_trm_core.launch import launch_stage\n"
        "launch_stage('tests.helpers.sleeper', load_config('tiny'), 2)\n"
    )
    env = {**os.environ, "SLEEPER_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    parent.send_signal(signal.SIGKILL)  # a preempted task process: no cleanup code runs
    parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), workers
