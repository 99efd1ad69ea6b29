"""A stand-in stage for launcher tests: records its pid, then sleeps (python -m tests.helpers.sleeper)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from llm_trm_core.stages.entry import parse_stage_args

if __name__ == "__main__":
    cfg, _, _ = parse_stage_args("sleeper", None)
    folder = Path(os.environ["SLEEPER_DIR"])
    (folder / f"{os.getpid()}.pid").write_text(str(os.getpid()))
    time.sleep(120)
