"""Model load time: SmolLM2-135M from its GGUF (conversion) vs from the safetensors cache; tiny model build.

./run python -m bench.model_load [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import emit, log, timer
from llm_trm_core.config import RuntimeConfig, load_config
from llm_trm_core.lm import load_language_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    local = load_config("local")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        runtime = RuntimeConfig(cache_dir=cache, device="cpu")
        log("converting the GGUF into a fresh cache ...")
        with timer() as t:
            load_language_model(local.model, runtime)
        emit("smollm2_load_from_gguf", t[0], "s", note="dequantize Q4_1 + save_pretrained into an empty cache")
        size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
        emit("smollm2_cache_size", size / 2**20, "MiB")
        times = []
        for _ in range(args.repeats):
            with timer() as t:
                load_language_model(local.model, runtime)
            times.append(t[0])
        emit("smollm2_load_from_safetensors_cache", min(times), "s", repeats=args.repeats, stat="min")
    tiny = load_config("tiny")
    times = []
    for _ in range(args.repeats):
        with timer() as t:
            load_language_model(tiny.model, RuntimeConfig(device="cpu"))
        times.append(t[0])
    emit("tiny_smollm3_build", min(times), "s", repeats=args.repeats, stat="min", note="BPE training + random init")


if __name__ == "__main__":
    main()
