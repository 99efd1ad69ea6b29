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


def bench_config(description: str | None, prefix: str) -> tuple[Any, str]:
    """A preset config from `--preset`, `--store` (default: a fresh temporary folder named `prefix`...) and
    repeated `--set key=value`; returns (config, store root)."""
    import argparse
    import tempfile

    from llm_trm_core.config import load_config

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--store", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    root = args.store or f"file://{tempfile.mkdtemp(prefix=prefix)}"
    return load_config(args.preset, [f"store.root={root}", *args.overrides]), root
