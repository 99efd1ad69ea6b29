"""Multi-process stages: `torchrun` as a child process that dies with its parent.

A stage (or any caller) runs `launch_stage("flows.cli", cfg, nproc, args=("stage", "compressor"))`:
the resolved config goes to a JSON file, `python -m torch.distributed.run --nproc_per_node N -m flows.cli
stage compressor --config-json FILE` runs in its own session, and the stage's result is its last JSON
stdout line.

Children die with their parent: torchrun gets PR_SET_PDEATHSIG(SIGKILL) (Linux) before exec, and every
worker sets the same on itself at start (LLM_TRM_DIE_WITH_PARENT=1, read by the stage entry point), so
a SIGKILLed task process (a preempted or cancelled run) leaves no training process behind; on any
other exit of the caller the whole process group is killed.

The workers' stderr is passed on line by line to this module's logger as they run (a stage's progress on
every rank reaches the caller's log), and a launch whose workers fail raises one `UserError` line naming
the rank that failed first and how (torchrun's own summary), after logging the output's tail.

The generation stages use `generation_processes` ranks (`runtime.generation_processes`, `auto`: every CUDA
device) and each rank binds its own GPU (`bind_local_gpu`): llm_trm_core/stages/spread.py.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from llm_trm_core.config import PipelineConfig, RuntimeConfig
from llm_trm_core.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

DIE_WITH_PARENT_ENV = "LLM_TRM_DIE_WITH_PARENT"
T = TypeVar("T")
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


def rank_and_world() -> tuple[int, int]:
    """This torchrun worker's rank and the number of workers ((0, 1) outside torchrun)."""
    if not in_torchrun():
        return 0, 1
    return int(os.environ.get("RANK", os.environ["LOCAL_RANK"])), int(os.environ["WORLD_SIZE"])


def share_of(items: Sequence[T], share: tuple[int, int]) -> list[T]:
    """Rank `share[0]`'s share of `items` among `share[1]` ranks: every ranks-th item from its rank-th (the
    units are ordered by size, so the ranks get similar loads)."""
    rank, ranks = share
    if not 0 <= rank < ranks:
        raise UserError(f"rank {rank} of {ranks} does not exist: ranks are 0..{ranks - 1}")
    return list(items[rank::ranks])


def uses_cuda(runtime: RuntimeConfig) -> bool:
    """Whether the models of a run on `runtime` go to CUDA: the device the model loader resolves."""
    from llm_trm_core.lm.loader import resolve_device

    return resolve_device(runtime.device).type == "cuda"


def generation_processes(runtime: RuntimeConfig) -> int:
    """The local processes of the generation stages: `runtime.generation_processes`, where `auto` is every
    CUDA device this process sees (1 on CPU). ConfigError when a number asks for more GPUs than there are."""
    wanted = runtime.generation_processes
    if not uses_cuda(runtime):
        return 1 if wanted == "auto" else wanted
    import torch

    devices = torch.cuda.device_count()
    if wanted == "auto":
        return max(1, devices)
    if wanted > devices:
        raise ConfigError(
            f"runtime.generation_processes={wanted} but this process sees {devices} CUDA device(s); one process "
            "uses one GPU: lower it, or use auto (every GPU the container was given)"
        )
    return wanted


def bind_local_gpu(runtime: RuntimeConfig) -> None:
    """Under torchrun on CUDA: make GPU `LOCAL_RANK` this worker's current device, so its models (placed on
    `cuda`, the current device) and tensors use its own GPU. A no-op on CPU and outside torchrun."""
    if in_torchrun() and uses_cuda(runtime):
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def launch_command(module: str, config_file: str, nproc: int, args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", module, *args, "--config-json", config_file,
    ]  # fmt: skip


_FAILURE_FIELD = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s*(.*)$")


def failure_summary(lines: Iterable[str]) -> str:
    """The worker torchrun names as the root cause ("rank 1 (local_rank: 1) failed first: exitcode -9 (pid:
    12) (SIGKILL)"), with the last `error:` line a worker printed; "" when neither is there."""
    fields: dict[str, str] = {}
    errors = []
    for line in lines:
        if line.lstrip().startswith("error:"):
            errors.append(line.strip())
        if "Root Cause" in line:  # the other failures are listed before it: keep the first one's fields
            fields.clear()
        if (m := _FAILURE_FIELD.match(line)) and m.group(1) not in fields:
            fields[m.group(1)] = " ".join(m.group(2).split())
    parts = []
    if "rank" in fields:
        parts.append(f"rank {fields['rank']} failed first: exitcode {fields.get('exitcode', '?')}")
        if "SIG" not in parts[-1] and fields.get("traceback", "").startswith("Signal"):
            parts[-1] += f" ({fields['traceback']})"
    if errors:
        parts.append(f"it said {errors[-1]}")
    return "; ".join(parts)


def _pass_on(stream: IO[str], tail: deque[str]) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        logger.info("%s", line.rstrip("\n"))


def launch_stage(
    module: str,
    cfg: PipelineConfig,
    nproc: int,
    timeout: float | None = None,
    args: Sequence[str] = (),
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `python -m module *args --config-json FILE` under torchrun with `nproc` processes; returns its JSON
    result (the last JSON line a worker printed). `inputs`: also written to a file passed as
    `--inputs-json FILE`. UserError (one line) when a worker fails."""
    with tempfile.TemporaryDirectory(prefix="llm-trm-launch-") as folder:
        config_file = str(Path(folder) / "config.json")
        Path(config_file).write_text(cfg.model_dump_json())
        extra = list(args)
        if inputs is not None:
            inputs_file = Path(folder) / "inputs.json"
            inputs_file.write_text(json.dumps(inputs))
            extra += ["--inputs-json", str(inputs_file)]
        env = {**os.environ, DIE_WITH_PARENT_ENV: "1"}
        logger.info("launching %s %s on %d processes", module, " ".join(args), nproc)
        proc = subprocess.Popen(
            launch_command(module, config_file, nproc, extra), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        tail: deque[str] = deque(maxlen=400)
        out: list[str] = []
        readers = [
            threading.Thread(target=_pass_on, args=(proc.stderr, tail), daemon=True),
            threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            for reader in readers:
                reader.join(timeout=10)
    results = [line for line in out if line.startswith("{")]
    if proc.returncode != 0 or not results:
        shown = "\n".join(f"  | {line}" for line in list(tail)[-60:])
        logger.error("the last output of %s %s:\n%s", module, " ".join(args), shown)
        why = failure_summary(tail) or f"exit {proc.returncode}"
        raise UserError(
            f"`{module} {' '.join(args)}` on {nproc} processes failed: {why}. What its workers committed stays "
            "in the store; a rerun continues from there (their output is in the log)"
        )
    return dict(json.loads(results[-1]))
