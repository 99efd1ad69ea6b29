"""Shared command line of the `python -m llm_trm_core.stages.<stage>` entry points (torchrun, workers, tests).

    python -m llm_trm_core.stages.<stage> --preset tiny --store URI [key=value ...]
    python -m llm_trm_core.stages.<stage> --config-json FILE          (a resolved config, from launch.py)
The result is written to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_trm_core.config import PipelineConfig, apply_overrides, load_config, parse_config
from llm_trm_core.launch import DIE_WITH_PARENT_ENV, die_with_parent
from llm_trm_core.store import ArtifactStore


def parse_stage_args(
    description: str, argv: list[str] | None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[PipelineConfig, ArtifactStore, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--store", default=None, help="artifact store root URI (overrides store.root)")
    parser.add_argument("--config-json", default=None, help="a resolved config as JSON (instead of --preset)")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trm.lr=0.001")
    args = parser.parse_args(argv)
    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [*args.overrides, *([f"store.root={args.store}"] if args.store else [])]
    if args.config_json:
        base = PipelineConfig.model_validate_json(Path(args.config_json).read_text())
        cfg = parse_config(apply_overrides(base.model_dump(mode="json"), overrides)) if overrides else base
    else:
        cfg = load_config(args.preset, overrides)
    return cfg, ArtifactStore(cfg.store.root), args


def emit_result(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
