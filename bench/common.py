"""Helpers for bench scripts: every figure is one JSON line {name, value, unit, config}."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def emit(name: str, value: float, unit: str, **config: Any) -> None:
    line = {"name": name, "value": round(value, 4), "unit": unit, "config": {**config, **machine()}}
    print(json.dumps(line), flush=True)


@contextmanager
def timer() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
