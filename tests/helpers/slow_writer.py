"""A writer process for the SIGKILL test: writes one file, then a second one slowly, then commits.

    python -m tests.helpers.slow_writer ROOT KEY slow|fast
In slow mode it prints WRITING after the first chunk of the second file and then stalls, so the
parent can SIGKILL it mid-file.
"""

from __future__ import annotations

import sys
import time

from llm_trm_core.store import ArtifactStore

CHUNK = b"x" * (256 * 1024)


def main() -> None:
    root, key, mode = sys.argv[1:4]
    store = ArtifactStore(root)
    with store.writer("demo", key, config={"n": 1}, code_version="1") as w:
        w.write_bytes("first.bin", b"complete file")
        with w.open("second.bin") as f:
            for i in range(8):
                f.write(CHUNK)
                if mode == "slow" and i == 0:
                    f.flush()
                    print("WRITING", flush=True)
                    time.sleep(600)
        w.commit({"chunks": 8})
    print("COMMITTED", flush=True)


if __name__ == "__main__":
    main()
