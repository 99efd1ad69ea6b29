"""Training checkpoints under `{root}/{stage}/{key}/checkpoints/step-XXXXXXXX/` (docs/architecture.md, "Resume").

A checkpoint is `state.pt` (model, optimizer, scheduler, RNG, data position, step, early-stopping
state: tensors and plain Python values only, loaded with `torch.load(weights_only=True)`), then a
`COMPLETE` marker written last. Only complete checkpoints are ever loaded; the newest wins.

Fault injection for tests: with LLM_TRM_FAULT_KILL=checkpoint:N the process SIGKILLs itself right
after checkpoint N is complete, as a preempted machine would die.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from llm_trm_core.errors import UserError
from llm_trm_core.faults import kill_if_requested
from llm_trm_core.store import CHECKPOINTS_DIR, TMP_MARKER, ArtifactStore

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
COMPLETE = "COMPLETE"


class Stateful(Protocol):
    """What a checkpoint can hold weights of: a module, an EMA, a subset of a module's parameters."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


class ParameterSubset:
    """Named parameters of a larger module (LoRA adapters inside the LM), checkpointed on their own."""

    def __init__(self, module: torch.nn.Module, names: set[str]) -> None:
        self.module = module
        self.names = names

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.module.named_parameters() if n in self.names}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        return self.module.load_state_dict(state_dict, strict=False)


class CheckpointManager:
    def __init__(self, store: ArtifactStore, stage: str, key: str, keep_last: int = 2) -> None:
        self.store = store
        self.stage = stage
        self.folder = store.path(stage, key, CHECKPOINTS_DIR)
        self.keep_last = keep_last

    def _dir(self, step: int) -> str:
        return f"{self.folder}/step-{step:08d}"

    def complete_steps(self) -> list[int]:
        fs = self.store.fs
        if not fs.exists(self.folder):
            return []
        steps = []
        for entry in fs.ls(self.folder, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step-") and TMP_MARKER not in name and fs.exists(f"{self.folder}/{name}/{COMPLETE}"):
                steps.append(int(name.removeprefix("step-")))
        return sorted(steps)

    def save(self, step: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        folder = self._dir(step)
        fs = self.store.fs
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{STATE_FILE}{TMP_MARKER}{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        self.store.publish(tmp, f"{folder}/{STATE_FILE}")
        fs.pipe(f"{folder}/{COMPLETE}", b"")
        logger.debug("checkpoint step %d saved (%d bytes)", step, buffer.tell())
        for old in self.complete_steps()[: -self.keep_last] if self.keep_last else []:  # 0: keep every one
            fs.rm(self._dir(old), recursive=True)
        kill_if_requested("checkpoint", step)
        kill_if_requested(f"{self.stage}-checkpoint", step)

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        steps = self.complete_steps()
        if not steps:
            return None
        step = steps[-1]
        state = self.load(step)
        logger.info("resuming from checkpoint step %d", step)
        return step, state

    def load(self, step: int) -> dict[str, Any]:
        """The state of complete checkpoint `step` (one of `complete_steps()`)."""
        with self.store.fs.open(f"{self._dir(step)}/{STATE_FILE}", "rb") as f:
            state: dict[str, Any] = torch.load(io.BytesIO(f.read()), weights_only=True)
        return state

    def restore(self, module: Stateful, state: Mapping[str, Any], step: int) -> None:
        """Load a checkpointed state dict, or explain why it does not fit."""
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(
                f"the checkpoint at {self.store.fs.unstrip_protocol(self._dir(step))} does not fit this model "
                f"({str(exc).splitlines()[0]}…): it was written by other code or another configuration. Delete "
                f"{self.store.fs.unstrip_protocol(self.folder)} to start this stage over."
            ) from None

    def clear(self) -> None:
        if self.store.fs.exists(self.folder):
            self.store.fs.rm(self.folder, recursive=True)
