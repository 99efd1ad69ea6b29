"""Stage 2 model: `trm`. Train the SequenceTRM on the compressed pairs and report it beside baselines.

Every number in the report is on the held-out **test** split: the TRM after each supervision step
s = 1..N_sup (EMA weights), the raw weights at the last step, and the baselines (training mean, last
pre-state, mean-pooled pre-states, ridge, kNN; ridge λ and k chosen on val). Metrics: mse, relative
error, cosine, centered cosine (around the training mean of the targets), R², and, after
decompression to D, the LM head's KL and top-1 agreement with the target.

    python -m llm_trm_core.stages.trm --preset tiny --store URI [k=v ...]
"""

from __future__ import annotations

import json
import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from llm_trm_core.compressor.metrics import ReconstructionMetrics
from llm_trm_core.config import PipelineConfig
from llm_trm_core.errors import UserError
from llm_trm_core.hidden_states import HiddenStates
from llm_trm_core.lm.loader import resolve_device
from llm_trm_core.models.trm import SequenceTRM
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.compressor import load_compressor
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, key_for, stage_config
from llm_trm_core.stages.pairs import PairsReader
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.trm.baselines import Features, fit_baselines
from llm_trm_core.trm.data import PairData
from llm_trm_core.trm.train import DecompressedHead, Head, evaluate_steps, relative_errors, train_trm

logger = logging.getLogger(__name__)

STAGE = "trm"
COLUMNS = ("name", "mse", "rel_error", "cosine", "cosine_centered", "r2", "lm_kl", "lm_top1")
STATE_STAGES = ("hiddens", "trace-hiddens")


def trm_kwargs(cfg: PipelineConfig, d: int) -> dict[str, Any]:
    t = cfg.trm
    return {
        "d": d, "n_layers": t.n_layers, "n_heads": t.n_heads, "mlp": t.mlp, "expansion": t.expansion, "norm": t.norm,
        "positions": t.positions, "output_norm": t.output_norm, "dropout": t.dropout, "n_latent": t.n_latent,
        "t_recursions": t.t_recursions, "halt_bias_init": t.halt_bias_init,
    }  # fmt: skip


def load_trm(store: ArtifactStore, manifest: Manifest) -> SequenceTRM:
    artifact = store.open(manifest.stage, manifest.key)
    model = SequenceTRM(**json.loads(artifact.read_bytes("config.json")))
    model.load_state_dict(load_safetensors(artifact.read_bytes("model.safetensors")))
    return model.eval()


def lm_head_for(store: ArtifactStore, compressor: Manifest) -> Head | None:
    """Decompress + the LM head stored with the hidden states the compressor was fitted on."""
    key = compressor.upstream.get("hiddens")
    for stage in STATE_STAGES:
        if key and store.read_manifest(stage, key) is not None:
            head = HiddenStates.open(store.open(stage, key)).lm_head()
            return DecompressedHead(load_compressor(store, compressor), head) if head else None
    return None


def input_statistics(data: PairData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of every training pre state (one streaming pass)."""
    count, total, squares = (
        0,
        torch.zeros(data.d_prime, dtype=torch.float64),
        torch.zeros(data.d_prime, dtype=torch.float64),
    )
    for pair in data.iter_pairs("train"):
        states = pair.pre.double()
        count += states.shape[0]
        total += states.sum(0)
        squares += (states**2).sum(0)
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def _metrics(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, head: Head | None) -> dict[str, float]:
    tracker = ReconstructionMetrics(mean, head, lm_head_tokens=1 << 30)  # type: ignore[arg-type]
    tracker.update(target.float(), pred.float())
    metrics = tracker.compute()
    metrics.pop("tokens", None)
    return metrics


def _plot(per_step: list[dict[str, float]], baselines: dict[str, dict[str, float]]) -> bytes:
    metrics = [m for m in ("r2", "cosine_centered", "lm_top1") if m in per_step[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.4))
    axes = list(axes) if len(metrics) > 1 else [axes]
    steps = [row["step"] for row in per_step]
    for ax, metric in zip(axes, metrics, strict=True):
        ax.plot(steps, [row[metric] for row in per_step], "o-", color="black", label="TRM (EMA)")
        for name, values in baselines.items():
            ax.axhline(values[metric], ls=":", lw=1.2, label=name, color=plt.cm.tab10(list(baselines).index(name)))
        ax.set_xlabel("supervision step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("TRM on held-out test pairs, per supervision step", y=1.04)
    png = png_bytes(fig)
    plt.close(fig)
    return png


def run_trm(cfg: PipelineConfig, store: ArtifactStore, pairs: Manifest, compressor: Manifest | None = None) -> Manifest:
    if compressor is not None and pairs.upstream.get("compressor") != compressor.key:
        raise UserError(
            f"the pairs artifact {pairs.uri} was made with compressor {pairs.upstream.get('compressor')}, "
            f"not the requested {compressor.key}; recompute the pairs with the requested compressor"
        )
    upstream = {"pairs": pairs.key}
    key = key_for(cfg, STAGE, upstream)
    if (manifest := store.read_manifest(STAGE, key)) is not None:
        return manifest
    t = cfg.trm
    data = PairData(PairsReader(store, pairs))
    data.require("train", "val", "test")
    train, val, test = (Features.of(data.iter_pairs(split)) for split in ("train", "val", "test"))
    target_mean = train.target.mean(0).float()
    train_rel = relative_errors(target_mean.expand_as(train.target), train.target)
    halt_threshold = float(torch.quantile(train_rel, t.halt_quantile))
    used_compressor = store.read_manifest("compressor", pairs.upstream["compressor"])
    head = lm_head_for(store, used_compressor) if used_compressor else None
    device = resolve_device(cfg.runtime.device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        model = SequenceTRM(**trm_kwargs(cfg, data.d_prime))
        model.set_normalization(*input_statistics(data), target_mean, train.target.float().std(0))
        tracker = Tracker(cfg.tracking, "trm", key, stage_config(cfg, STAGE))
        result, ema = train_trm(
            model, data, t, seed=cfg.runtime.seed, device=device, halt_threshold=halt_threshold,
            halt_quantile=t.halt_quantile, target_mean=target_mean,
            checkpoints=CheckpointManager(store, STAGE, key), tracker=tracker,
        )  # fmt: skip
    final = ema.module if ema is not None else model
    assert isinstance(final, SequenceTRM)
    halt_threshold = result.halt_threshold
    per_step = evaluate_steps(
        final, data, "test", t.n_supervision, target_mean, halt_threshold, head, t.batch_size, device
    )
    raw = evaluate_steps(model, data, "test", t.n_supervision, target_mean, halt_threshold, head, t.batch_size, device)[
        -1
    ]
    predictors, chosen = fit_baselines(train, val, t.ridge_lambdas, t.knn_ks)
    baselines = {
        name: _metrics(predict(test).float(), test.target, target_mean, head) for name, predict in predictors.items()
    }

    rows = [{"name": f"baseline: {name}", **values} for name, values in baselines.items()]
    rows += [{"name": f"TRM step {row['step']}" + (" (EMA)" if ema else ""), **row} for row in per_step]
    rows.append({"name": f"TRM step {t.n_supervision} (raw weights)", **raw})
    best = max(baselines, key=lambda name: baselines[name]["r2"])
    verdict = (
        f"TRM (last step) R² {per_step[-1]['r2']:.4f} vs best baseline {best} R² {baselines[best]['r2']:.4f}: "
        + (
            "the TRM beats every baseline."
            if per_step[-1]["r2"] > baselines[best]["r2"]
            else "the TRM does NOT beat the best baseline."
        )
    )
    report = (
        f"# TRM on held-out test pairs ({data.count('test')} test / {data.count('train')} train)\n\n"
        + markdown_table(rows, COLUMNS)
        + f"\n\n{verdict}\n\nRidge λ = {chosen['ridge_lambda']}, kNN k = {int(chosen['knn_k'])} (chosen on val). "
        f"Halting target threshold (relative error) = {halt_threshold:.4g}; its positive rate on test by step: "
        + ", ".join(f"{row['halt_target_rate']:.2f}" for row in per_step)
        + ".\n"
    )
    weights = save_safetensors({k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()})
    summary = {
        "test": per_step[-1],
        "baselines": baselines,
        "per_step": per_step,
        "raw_weights_last_step": raw,
        "chosen": chosen,
        "beats_best_baseline": per_step[-1]["r2"] > baselines[best]["r2"],
        "halt": {"threshold": halt_threshold, "train_positive_rate_by_step": result.halt_positive_rate_train},
        "training": {
            "steps": result.steps,
            "nan_resets": result.nan_resets,
            "resumed_from": result.resumed_from,
            "seconds": round(result.seconds, 2),
            "history": result.history,
        },
        "pairs": {split: data.count(split) for split in ("train", "val", "test")},
    }
    with store.writer(
        STAGE, key, config=stage_config(cfg, STAGE), code_version=STAGE_CODE_VERSIONS[STAGE], upstream=upstream
    ) as w:
        w.write_bytes("model.safetensors", weights)
        w.write_json("config.json", trm_kwargs(cfg, data.d_prime))
        w.write_bytes("report.md", report.encode())
        w.write_bytes("per_step.png", _plot(per_step, baselines))
        manifest = w.commit(summary)
    tracker.summary({f"test/{k}": v for k, v in per_step[-1].items()})
    tracker.finish()
    CheckpointManager(store, STAGE, key).clear()
    return manifest


def main(argv: list[str] | None = None) -> None:
    from llm_trm_core.stages.entry import emit_result, parse_stage_args

    cfg, store, _ = parse_stage_args("TRM stage (runs every upstream stage first, cached).", argv)
    manifest = run_trm(cfg, store, run_upstream_pairs(cfg, store))
    emit_result({"key": manifest.key, "uri": manifest.uri})


def run_upstream_pairs(cfg: PipelineConfig, store: ArtifactStore) -> Manifest:
    """problems -> 1a -> datagen -> 1b -> pairs, without Prefect (for subprocess entry points)."""
    from llm_trm_core.stages.compressor import run_basis, run_compressor, run_corpus_hiddens
    from llm_trm_core.stages.datagen import datagen_problems, plan_shards, run_datagen_report, run_datagen_shard
    from llm_trm_core.stages.pairs import run_pairs, run_trace_hiddens
    from llm_trm_core.stages.problems import run_problems

    problems = run_problems(cfg, store)
    hiddens = run_corpus_hiddens(cfg, store)
    first = run_compressor(cfg, store, hiddens, run_basis(cfg, store, hiddens))
    specs = plan_shards(cfg, len(datagen_problems(store, problems, cfg)))
    datagen = run_datagen_report(cfg, store, problems, [run_datagen_shard(cfg, store, problems, s) for s in specs])
    traces = run_trace_hiddens(cfg, store, datagen)
    tuned = run_compressor(cfg, store, traces, run_basis(cfg, store, traces), phase="1b", init=first)
    return run_pairs(cfg, store, datagen, tuned)


if __name__ == "__main__":
    main()
