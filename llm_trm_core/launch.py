"""Multi-process stages: `torchrun` as a child process that dies with its parent.

A stage (or any caller) runs `launch_stage("flows.cli", cfg, nproc, args=("stage", "compressor"))`:
the resolved config goes to a JSON file, `python -m torch.distributed.run --nproc_per_node N -m flows.cli
stage compressor --config-json FILE` runs in its own session, and the stage's result is its last JSON
stdout line.

Children die with their parent: torchrun gets PR_SET_PDEATHSIG(SIGKILL) (Linux) before exec, and every
worker sets the same on itself at start (LLM_TRM_DIE_WITH_PARENT=1, read by the stage entry point), so
a SIGKILLed task process (a preempted or cancelled run) leaves no training process behind; on any
other exit of the caller the whole process group is killed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError

logger = logging.getLogger(__name__)

DIE_WITH_PARENT_ENV = "LLM_TRM_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def in_torchrun() -> bool:
    """Whether this process is a worker started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_command(module: str, config_file: str, nproc: int, args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", module, *args, "--config-json", config_file,
    ]  # fmt: skip


def launch_stage(
    module: str, cfg: PipelineConfig, nproc: int, timeout: float | None = None, args: Sequence[str] = ()
) -> dict[str, Any]:
    """Run `python -m module *args --config-json FILE` under torchrun with `nproc` processes; returns its JSON
    result."""
    with tempfile.TemporaryDirectory(prefix="llm-trm-launch-") as folder:
        config_file = str(Path(folder) / "config.json")
        Path(config_file).write_text(cfg.model_dump_json())
        env = {**os.environ, DIE_WITH_PARENT_ENV: "1"}
        logger.info("launching %s on %d processes", module, nproc)
        proc = subprocess.Popen(
            launch_command(module, config_file, nproc, args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    results = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not results:
        raise UserError(
            f"`{module}` on {nproc} processes failed (exit {proc.returncode}); its last output:\n{stderr[-3000:]}"
        )
    return dict(json.loads(results[-1]))
