"""Held-out compressor quality against the number of corpus tokens it was fitted on: how big the corpus
must be.

    ./run python -m bench.corpus_curve [--preset local] [--store file:///tmp/budget/after-store] [--set k=v ...]

Runs (or reuses, from --store) the `hiddens` stage of the preset, then fits the closed-form compressor at
the preset's D' on the first n training tokens (documents in corpus order) for growing n, and measures it
on the same held-out test tokens every time: FVU (fraction of variance unexplained), cosine, and LM-head
fidelity (KL and top-1 agreement of the head's next-token distribution). One JSON line per n; the table
at the end. The corpus size of a preset is read off this curve: the point past which more tokens stop
improving the held-out figures.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import bench_config, emit, log, timer
from llm_trm_core.compressor.artifacts import open_hiddens
from llm_trm_core.compressor.moments import MomentAccumulator, solve
from llm_trm_core.models.compressor import LinearCompressor
from llm_trm_core.stages.compressor import evaluate_compressor, run_corpus_hiddens
from llm_trm_core.store import ArtifactStore

FRACTIONS = (0.03, 0.06, 0.125, 0.25, 0.5, 1.0)


def main() -> None:
    cfg, root = bench_config(__doc__, "bench-corpus-")
    store = ArtifactStore(root)
    with timer() as t:
        manifest = run_corpus_hiddens(cfg, store)
    log(f"hiddens: {t[0]:.0f} s ({manifest.metrics})")
    states = open_hiddens(store, manifest)
    total = states.tokens("train")
    documents = int(manifest.metrics.get("documents", 0))
    d_prime = cfg.compressor.d_prime
    rows: list[dict[str, Any]] = []
    for fraction in FRACTIONS:
        budget = max(2, int(total * fraction))
        moments = MomentAccumulator(states.hidden_size)
        seen = 0
        for chunk in states.iter_rows("train"):
            take = chunk[: budget - seen]
            moments.update(take)
            seen += take.shape[0]
            if seen >= budget:
                break
        basis = solve(moments, cfg.compressor.centered)
        model = LinearCompressor(states.hidden_size, d_prime, centered=cfg.compressor.centered)
        model.set_weights(basis.weight(d_prime), basis.offset())
        with torch.no_grad():
            metrics = evaluate_compressor(model, states, basis, "test", cfg.compressor.eval_lm_head_tokens)["model"]
        row = {
            "train_tokens": seen,
            "fraction": fraction,
            "approx_documents": round(documents * fraction),
            "test_fvu": round(float(metrics["fvu"]), 4),
            "test_cosine": round(float(metrics["cosine"]), 4),
            "lm_kl": round(float(metrics.get("lm_kl", float("nan"))), 4),
            "lm_top1": round(float(metrics.get("lm_top1", float("nan"))), 4),
        }
        rows.append(row)
        emit("corpus_curve", row["test_fvu"], "test FVU", **{k: v for k, v in row.items() if k != "test_fvu"})
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    log(f"D'={d_prime}, {states.tokens('test')} held-out test tokens\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
