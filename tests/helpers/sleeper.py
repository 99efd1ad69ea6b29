"""A stand-in stage for launcher tests: records its pid, then sleeps (`python -m tests.helpers.sleeper`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from llm_trm_core.launch import DIE_WITH_PARENT_ENV, die_with_parent

if __name__ == "__main__":
    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        die_with_parent()
    folder = Path(os.environ["SLEEPER_DIR"])
    (folder / f"{os.getpid()}.pid").write_text(str(os.getpid()))
    time.sleep(120)
