"""TRM training speed on CPU: step time, samples/s, FLOPs per optimizer step, and how far that is from
the machine's own dense-matmul throughput.

    ./run python -m bench.trm_speed [--preset local] [--pre-len 80] [--steps 20]

Shapes follow the preset (D' = compressor.d_prime, the TRM config, trm.batch_size) with the mean
pre length of the local pairs (~80 positions). One optimizer step = one supervision step
(T−1 recursions without gradients + one with, backward, AdamW).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.common import emit, timer
from llm_trm_core.config import load_config
from llm_trm_core.models.trm import SequenceTRM
from llm_trm_core.stages.trm import trm_kwargs


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    with timer() as t:
        for _ in range(repeats):
            a @ b
    return 2 * n**3 * repeats / t[0] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--pre-len", type=int, default=80)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config(args.preset)
    d, b, t = cfg.compressor.d_prime, cfg.trm.batch_size, cfg.trm
    torch.manual_seed(0)
    model = SequenceTRM(**trm_kwargs(cfg, d))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)
    pre, mask, post = torch.randn(b, args.pre_len, d), torch.ones(b, args.pre_len), torch.randn(b, d)
    params = sum(p.numel() for p in model.parameters())
    shape = {"preset": args.preset, "d_prime": d, "batch": b, "pre_len": args.pre_len, "n_latent": t.n_latent,
             "t_recursions": t.t_recursions, "n_layers": t.n_layers, "params": params}  # fmt: skip

    def step() -> None:
        prepared = model.prepare(pre, mask)
        _, prediction, halt = model.supervision_step(prepared, model.initial_carry(prepared))
        loss = F.mse_loss(prediction, post) + 0.5 * F.binary_cross_entropy_with_logits(halt, torch.ones_like(halt))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    with timer() as elapsed:
        for _ in range(args.steps):
            step()
    seconds = elapsed[0] / args.steps
    emit("trm_step_time", seconds * 1000, "ms/optimizer step", **shape)
    emit("trm_samples_per_s", b / (seconds * t.n_supervision), "samples/s", n_supervision=t.n_supervision, **shape)
    emit("trm_flops_per_step", flops / 1e9, "GFLOP", **shape)
    achieved = flops / seconds / 1e9
    peak = matmul_gflops()
    emit("trm_achieved_gflops", achieved, "GFLOP/s", **shape)
    emit("cpu_matmul_gflops", peak, "GFLOP/s", note="1024x1024 float32 torch.mm on this machine")
    emit("trm_fraction_of_matmul_peak", achieved / peak, "fraction", **shape)


if __name__ == "__main__":
    main()
