"""Shared command line of the `python -m llm_trm_core.stages.<stage>` entry points (torchrun, workers, tests).

    python -m llm_trm_core.stages.<stage> --preset tiny --store URI [key=value ...]
The result is written to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from llm_trm_core.config import PipelineConfig, load_config
from llm_trm_core.store import ArtifactStore


def parse_stage_args(
    description: str, argv: list[str] | None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[PipelineConfig, ArtifactStore, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--store", default=None, help="artifact store root URI (overrides store.root)")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trm.lr=0.001")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.preset, [*args.overrides, *([f"store.root={args.store}"] if args.store else [])])
    return cfg, ArtifactStore(cfg.store.root), args


def emit_result(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
