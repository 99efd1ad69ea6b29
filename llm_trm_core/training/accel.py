"""One accelerate `Accelerator` per process, rebuilt when a later stage asks for another precision."""

from __future__ import annotations

from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState

_current: tuple[Accelerator, tuple[bool, str]] | None = None


def get_accelerator(device: str, mixed_precision: Literal["no", "bf16", "fp16"]) -> Accelerator:
    """CPU when asked (or when no CUDA is present with device=auto); under torchrun this joins the gloo/NCCL group."""
    global _current
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    wanted = (cpu, mixed_precision)
    if _current is not None and _current[1] == wanted:
        return _current[0]
    if _current is not None and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    _current = (accelerator, wanted)
    return accelerator
