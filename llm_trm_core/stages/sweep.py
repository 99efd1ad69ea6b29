"""The D' sweep: closed form and SGD compressors at every D' (capped below D), then one report.

The report compares, per D', the exact solution with SGD from an orthogonal init (the original's
method) on the held-out test split: table (report.md, table.json) and plot (plot.png).
"""

from __future__ import annotations

import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.store import ArtifactStore, Manifest

logger = logging.getLogger(__name__)

SWEEP_SOLVERS = ("closed_form", "sgd")
COLUMNS = ("d_prime", "solver", "cosine", "cosine_centered", "fvu", "rel_error", "lm_kl", "lm_top1", "sgd_steps",
           "sgd_seconds")  # fmt: skip


def sweep_points(cfg: PipelineConfig, hidden_size: int) -> list[tuple[int, str]]:
    """(D', solver) pairs; D' values at or above the hidden size are dropped (nothing to compress)."""
    kept = sorted({d for d in cfg.sweep.d_primes if d < hidden_size})
    dropped = sorted({d for d in cfg.sweep.d_primes if d >= hidden_size})
    if dropped:
        logger.warning("sweep: dropping D' %s: not below the model's hidden size %d", dropped, hidden_size)
    if not kept:
        raise UserError(f"sweep.d_primes={cfg.sweep.d_primes} has no value below the model's hidden size {hidden_size}")
    return [(d, solver) for d in kept for solver in SWEEP_SOLVERS]


def _row(manifest: Manifest) -> dict[str, Any]:
    m = manifest.metrics
    test = m["test"]
    sgd = m.get("sgd") or {}
    return {
        "d_prime": m["d_prime"],
        "solver": m["solver"],
        **{k: test.get(k) for k in COLUMNS if k in test},
        "sgd_steps": sgd.get("steps"),
        "sgd_seconds": sgd.get("seconds"),
        "key": manifest.key,
    }


def _plot(rows: list[dict[str, Any]], baseline_fvu: float | None) -> bytes:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for solver, style in (("closed_form", "o-"), ("sgd", "s--")):
        pts = sorted((r["d_prime"], r) for r in rows if r["solver"] == solver)
        xs = [d for d, _ in pts]
        for ax, metric in zip(axes, ("fvu", "cosine_centered", "lm_kl"), strict=True):
            ax.plot(xs, [r[metric] for _, r in pts], style, label=solver)
    if baseline_fvu is not None:
        axes[0].axhline(baseline_fvu, color="grey", lw=1, ls=":", label="random init")
    for ax, title in zip(axes, ("FVU (lower is better)", "centered cosine", "LM-head KL"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("D'")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("compressor sweep, held-out test tokens", y=1.04)
    png = png_bytes(fig)
    plt.close(fig)
    return png


def run_sweep_report(cfg: PipelineConfig, store: ArtifactStore, points: list[Manifest]) -> Manifest:
    stage = "sweep"
    upstream = {f"{m.metrics['solver']}-d{m.metrics['d_prime']}": m.key for m in points}
    key, manifest = cached(cfg, store, stage, upstream)
    if manifest is not None:
        return manifest
    rows = sorted((_row(m) for m in points), key=lambda r: (r["d_prime"], r["solver"]))
    random_init = points[0].metrics["baselines"]["random_init"] if points else {}
    baseline_rows = [
        {"d_prime": points[0].metrics["d_prime"], "solver": f"baseline: {name}", **values}
        for name, values in (points[0].metrics.get("baselines") or {}).items()
    ]
    report = (
        "# Compressor sweep (held-out test split)\n\n"
        + markdown_table(rows, COLUMNS)
        + "\n\nBaselines at the smallest D' (the mean baseline does not depend on D'):\n\n"
        + markdown_table(baseline_rows, COLUMNS[:-2])
        + "\n"
    )
    with stage_writer(cfg, store, stage, key, upstream) as writer:
        writer.write_json("table.json", rows)
        writer.write_bytes("report.md", report.encode())
        writer.write_bytes("plot.png", _plot(rows, random_init.get("fvu")))
        return writer.commit({"points": len(rows), "rows": rows})
