"""Per-stage budget of a pipeline run on an empty store: wall time, LM tokens, achieved throughput.

    ./run python -m bench.stage_budget [--preset local] [--store file:///tmp/budget] [--set key=value ...]

Runs the whole pipeline graph without Prefect (the plain path of `llm-trm stage`, the same stage code the
flows run; Prefect adds its server start and about a second per task), on a fresh temporary store unless
--store is given, with the model cache already present. For every stage it prints one table row:

- wall seconds;
- LM tokens by kind: prefill (forward passes over more than one position without gradients, hidden-state
  passes included), decode (one new position per sequence per step) with the number of decode steps, and
  train (positions through a forward that keeps gradients, whose backward costs about twice as much again);
- LM-head rows (positions whose vocabulary logits were computed);
- achieved GFLOP/s of that LM work: 2 x (non-embedding parameters) per position, x3 for train positions,
  plus 2 x hidden x vocab per LM-head row, over the stage's wall time;
- decode tokens/s and decode steps/s.

Beside the table: this machine's dense float32 matmul throughput (2048², best of 5) and its memory
bandwidth (best of 5 copies of a 512 MiB tensor); the weight-streaming bound of a decode step is the
model's weight bytes over that bandwidth (a step cannot be faster than one read of every weight).

Token counts come from wrapping the `forward` of the loaded model's transformer body class and of its
output head (LM-head rows: every caller's logits, `generate`'s and our decode loop's); the stages
themselves are not changed for the bench.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from bench.common import bench_config, emit, log, timer
from llm_trm_core.config import PipelineConfig
from llm_trm_core.store import Manifest

COUNTS: dict[str, float] = defaultdict(float)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        with timer() as t:
            a @ b
        best = min(best, t[0])
    return 2 * n**3 / best / 1e9


def memory_gbps(mib: int = 512, repeats: int = 5) -> float:
    src = torch.empty(mib * 2**18, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        with timer() as t:
            dst.copy_(src)
        best = min(best, t[0])
    return 2 * src.numel() * 4 / best / 1e9  # read + write


def _shape(kwargs: dict[str, Any], args: tuple[Any, ...]) -> tuple[int, int] | None:
    tensor = kwargs.get("input_ids")
    if tensor is None and args and isinstance(args[0], torch.Tensor):
        tensor = args[0]
    if tensor is None:
        tensor = kwargs.get("inputs_embeds")
    if tensor is None:
        return None
    return int(tensor.shape[0]), int(tensor.shape[1])


def _count_body(forward: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        shape = _shape(kwargs, args)
        if shape is not None:
            batch, length = shape
            if torch.is_grad_enabled():
                COUNTS["train"] += batch * length
            elif length == 1:
                COUNTS["decode"] += batch
                COUNTS["decode_steps"] += 1
            else:
                COUNTS["prefill"] += batch * length
        return forward(self, *args, **kwargs)

    return wrapped


def _count_head(forward: Callable[..., Any], vocab: int) -> Callable[..., Any]:
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == vocab:
            COUNTS["head"] += out[..., 0].numel()
        return out

    return wrapped


def instrument(cfg: PipelineConfig) -> dict[str, float]:
    """Wrap the loaded model class's forwards; returns the LM's size figures used for FLOPs."""
    from llm_trm_core.lm.loader import shared_language_model

    lm = shared_language_model(cfg.model, cfg.runtime)
    body = type(lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model.base_model)
    body.forward = _count_body(body.forward)  # type: ignore[method-assign]
    head: Any = type(lm.model.get_output_embeddings())  # every caller's logits pass it: generate's, our decode's
    head.forward = _count_head(head.forward, int(lm.model.get_output_embeddings().weight.shape[0]))
    embed = lm.model.get_input_embeddings().weight
    params = sum(p.numel() for p in lm.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return {
        "body_params": float(params - embed.numel()),
        "head_macs": float(embed.numel()),
        "weight_bytes": float(weight_bytes),
    }


def main() -> None:
    cfg, root = bench_config(__doc__, "bench-budget-")

    from llm_trm_core.stages.graph import run_plain

    peak, bandwidth = matmul_gflops(), memory_gbps()
    size = instrument(cfg)
    bound = bandwidth * 1e9 / size["weight_bytes"]
    emit("matmul_peak", peak, "GFLOP/s", dtype="float32", n=2048)
    emit("memory_bandwidth", bandwidth, "GB/s", note="read+write of a 512 MiB copy")
    emit("decode_step_bound", bound, "steps/s", weight_mib=round(size["weight_bytes"] / 2**20))

    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = defaultdict(int)

    def hook(name: str, _cfg: PipelineConfig, run: Callable[[], Manifest]) -> Manifest:
        seen[name] += 1
        stage = name if seen[name] == 1 else f"{name}#{seen[name]}"
        COUNTS.clear()
        start = time.perf_counter()
        manifest = run()
        wall = time.perf_counter() - start
        flops = 2 * size["body_params"] * (COUNTS["prefill"] + COUNTS["decode"] + 3 * COUNTS["train"])
        flops += 2 * size["head_macs"] * COUNTS["head"]
        row = {
            "stage": stage,
            "wall_s": round(wall, 1),
            "prefill": int(COUNTS["prefill"]),
            "decode": int(COUNTS["decode"]),
            "decode_steps": int(COUNTS["decode_steps"]),
            "train": int(COUNTS["train"]),
            "head_rows": int(COUNTS["head"]),
            "gflops": round(flops / wall / 1e9, 1) if wall > 0 else 0.0,
            "decode_tok_s": round(COUNTS["decode"] / wall, 1) if wall > 0 else 0.0,
            "decode_steps_s": round(COUNTS["decode_steps"] / wall, 2) if wall > 0 else 0.0,
        }
        rows.append(row)
        log(f"{stage}: {row}")
        emit(f"stage_{stage}", wall, "s", **{k: v for k, v in row.items() if k not in ("stage", "wall_s")})
        return manifest

    log(f"pipeline ({cfg.preset}) on {root} ...")
    with timer() as total:
        run_plain(cfg, "pipeline", hook)
    emit("pipeline_total", total[0], "s", preset=cfg.preset, stages=len(rows))
    print_table(rows, total[0], peak, bandwidth, bound)


def print_table(rows: list[dict[str, Any]], total: float, peak: float, bandwidth: float, bound: float) -> None:
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    lines.append(f"\ntotal {total:.0f} s; matmul peak {peak:.0f} GFLOP/s; memory {bandwidth:.1f} GB/s; ")
    lines[-1] += f"decode-step bound {bound:.1f} steps/s"
    log("\n".join(lines))


if __name__ == "__main__":
    main()
