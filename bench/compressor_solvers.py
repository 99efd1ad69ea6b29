"""Closed-form solve vs SGD for the linear compressor: wall time and held-out quality at each D'.

    ./run python -m bench.compressor_solvers [--preset local] [--store file://./artifacts] [--d-primes 64 128 256 512]

Reuses (or first computes) the cached corpus hidden states of the preset. The closed form is one
streaming pass (float64 moments) plus one eigendecomposition that serves every D'; SGD is the
original's method (AdamW from an orthogonal init, the preset's epochs and schedule, early stopping on
the validation split). Quality is measured on the held-out test split.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import emit, log, timer
from llm_trm_core.compressor.moments import MomentAccumulator, solve
from llm_trm_core.compressor.train import train_sgd
from llm_trm_core.config import load_config
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.stages.compressor import evaluate_compressor, open_hiddens, run_corpus_hiddens, with_compressor
from llm_trm_core.store import ArtifactStore
from llm_trm_core.training.accel import get_accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--store", default="file://./artifacts")
    parser.add_argument("--d-primes", type=int, nargs="+", default=[64, 128, 256, 512])
    args = parser.parse_args()
    cfg = load_config(args.preset, [f"store.root={args.store}"])
    store = ArtifactStore(cfg.store.root)
    log("hidden states (cached after the first run) ...")
    states = open_hiddens(store, run_corpus_hiddens(cfg, store))
    common = {"preset": args.preset, "hidden_size": states.hidden_size, "train_tokens": states.tokens("train")}

    with timer() as t:
        moments = MomentAccumulator(states.hidden_size)
        for rows in states.iter_rows("train"):
            moments.update(rows)
        basis = solve(moments, cfg.compressor.centered)
    emit("closed_form_solve_time", t[0], "s", note="one pass + eigh, shared by every D'", **common)

    accelerator = get_accelerator("cpu", "no")
    for d in (d for d in args.d_primes if d < states.hidden_size):
        model = LinearCompressor(states.hidden_size, d, centered=cfg.compressor.centered)
        with timer() as t:
            model.set_weights(basis.weight(d), basis.offset())
        test = evaluate_compressor(model, states, basis, "test", cfg.compressor.eval_lm_head_tokens)["model"]
        for metric in ("cosine", "cosine_centered", "fvu", "lm_kl", "lm_top1"):
            emit(f"closed_form_{metric}", test[metric], "", d_prime=d, **common)

        sgd_cfg = with_compressor(cfg, d_prime=d, solver="sgd").compressor
        torch.manual_seed(cfg.runtime.seed)
        model = LinearCompressor(states.hidden_size, d, centered=cfg.compressor.centered)
        with timer() as t:
            result = train_sgd(model, states, sgd_cfg, seed=cfg.runtime.seed, accelerator=accelerator)
        model.load_state_dict(result.weights)
        emit("sgd_train_time", t[0], "s", d_prime=d, steps=result.steps, epochs=sgd_cfg.epochs, **common)
        test = evaluate_compressor(model, states, basis, "test", cfg.compressor.eval_lm_head_tokens)["model"]
        for metric in ("cosine", "cosine_centered", "fvu", "lm_kl", "lm_top1"):
            emit(f"sgd_{metric}", test[metric], "", d_prime=d, **common)


if __name__ == "__main__":
    main()
