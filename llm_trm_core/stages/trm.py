"""Stage 2 model: `trm`. Train the SequenceTRM on the compressed pairs and report it beside baselines.

Every number in the report is on the held-out **test** split: the TRM after each supervision step
s = 1..N_sup (EMA weights), the raw weights at the last step, and the baselines (training mean, last
pre-state, mean-pooled pre-states, ridge, kNN; ridge λ and k chosen on val). Metrics: mse, relative
error, cosine, centered cosine (around the training mean of the targets), R², and, after
decompression to D, the LM head's KL and top-1 agreement with the target.

    llm-trm stage trm --preset tiny --store URI [k=v ...]      (without Prefect)
"""

from __future__ import annotations

import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import save as save_safetensors

from llm_trm_core.config import PipelineConfig, TRMConfig
from llm_trm_core.errors import UserError
from llm_trm_core.lm.loader import resolve_device, token_texts
from llm_trm_core.metrics import ReconstructionMetrics
from llm_trm_core.models.trm import SequenceTRM
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.keys import stage_config
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.stats import paired_bootstrap, verdict
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.tracking import Tracker
from llm_trm_core.training.checkpoints import CheckpointManager
from llm_trm_core.trm.artifacts import lm_head_for
from llm_trm_core.trm.baselines import Features, fit_baselines
from llm_trm_core.trm.data import PairData
from llm_trm_core.trm.pairs import PairsReader
from llm_trm_core.trm.train import Head, eval_batch_size, evaluate_steps, relative_errors, train_trm

logger = logging.getLogger(__name__)

STAGE = "trm"
COLUMNS = (
    "name", "std_mse", "mse", "rel_error", "cosine", "cosine_centered", "r2", "r2_heldout_mean", "lm_kl", "lm_top1"
)  # fmt: skip
NEAR_CONSTANT_SHARE = 0.9  # the target's LM-head top-1 is one token this often: the distribution is near-constant


def trm_kwargs(cfg: PipelineConfig, d: int) -> dict[str, Any]:
    t = cfg.trm
    return {
        "d": d, "n_layers": t.n_layers, "n_heads": t.n_heads, "mlp": t.mlp, "expansion": t.expansion, "norm": t.norm,
        "positions": t.positions, "output_norm": t.output_norm, "dropout": t.dropout, "n_latent": t.n_latent,
        "t_recursions": t.t_recursions, "halt_bias_init": t.halt_bias_init, "readout": t.readout,
    }  # fmt: skip


def input_statistics(data: PairData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of every training pre state (one streaming pass)."""
    count, total, squares = (
        0,
        torch.zeros(data.d_prime, dtype=torch.float64),
        torch.zeros(data.d_prime, dtype=torch.float64),
    )
    for columns in data.iter_columns("train"):
        states = columns.rows.double()
        count += states.shape[0]
        total += states.sum(0)
        squares += (states**2).sum(0)
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def relabel_r2(metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's R² is against the TRAINING mean (the mean baseline scores exactly 0); the held-out-mean
    version is kept as r2_heldout_mean."""
    out = dict(metrics)
    if "r2_train_mean" in out:
        out["r2_heldout_mean"] = out["r2"]
        out["r2"] = out.pop("r2_train_mean")
    return out


def _metrics(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, head: Head | None) -> dict[str, float]:
    tracker = ReconstructionMetrics(mean, head, lm_head_tokens=1 << 30, r2_against_train_mean=True)  # type: ignore[arg-type]
    tracker.update(target.float(), pred.float())
    metrics = tracker.compute()
    metrics.pop("tokens", None)
    return relabel_r2(metrics)


def pair_errors(pred: torch.Tensor, target: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,) per-pair mean squared error in standardized target space: the TRM's training objective."""
    return (((pred.double() - target.double()) / std.double()) ** 2).mean(-1)


@torch.no_grad()
def final_predictions(
    model: SequenceTRM, data: PairData, split: str, n_steps: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """(N, D') raw-scale predictions after the last supervision step, in the split's pair order."""
    was_training = model.training
    model.eval()
    out = [
        model.predict_steps(b.to(device).pre, b.to(device).mask, n_steps)[-1][0].float().cpu()
        for b in data.iter_batches(split, batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def evaluate_test(
    final: SequenceTRM,
    raw_model: SequenceTRM,
    data: PairData,
    t: TRMConfig,
    target_mean: torch.Tensor,
    halt_threshold: float,
    head: Head | None,
    device: torch.device,
) -> tuple[list[dict[str, Any]], dict[str, Any], torch.Tensor]:
    """The stage's test evaluation: metrics after every supervision step with the final (EMA) weights, the raw
    weights' last step, and the final weights' last-step predictions (N, D'), in the test pairs' order."""
    batch = eval_batch_size(t.batch_size)
    predictions: list[torch.Tensor] = []
    n = t.n_supervision
    per_step = [
        relabel_r2(row)
        for row in evaluate_steps(final, data, "test", n, target_mean, halt_threshold, head, batch, device, predictions)
    ]
    raw = relabel_r2(evaluate_steps(raw_model, data, "test", n, target_mean, halt_threshold, head, batch, device)[-1])
    return per_step, raw, torch.cat(predictions)


@torch.no_grad()
def target_distribution(head: Head | None, targets: torch.Tensor) -> dict[str, Any] | None:
    """What the LM head reads from the post states: the token it puts first (the token that follows `</think>`
    in the pairs, as the LM predicts it), how often that is one token, and the next-token entropy."""
    if head is None or targets.shape[0] == 0:
        return None
    logp = torch.cat(
        [head.logits(targets[i : i + 256].float()).float().log_softmax(-1) for i in range(0, len(targets), 256)]
    )
    top1 = logp.argmax(-1)
    values, counts = top1.unique(return_counts=True)
    share = float(counts.max()) / len(top1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    return {
        "top_token_id": int(values[counts.argmax()]),
        "top_token_share": share,
        "distinct_top_tokens": len(values),
        "entropy_nats": entropy,
        "near_constant": share >= NEAR_CONSTANT_SHARE,
    }


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
    key, manifest = cached(cfg, store, STAGE, upstream)
    if manifest is not None:
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
    per_step, raw, final_test = evaluate_test(final, model, data, t, target_mean, halt_threshold, head, device)
    predictors, chosen = fit_baselines(train, val, t.ridge_lambdas, t.knn_ks)
    baselines = {
        name: _metrics(predict(test).float(), test.target, target_mean, head) for name, predict in predictors.items()
    }
    # the deciding metric: per-pair standardized MSE (what the TRM is trained on), paired over test pairs
    std = train.target.float().std(0).clamp_min(1e-6)
    trm_errors = pair_errors(final_test, test.target, std)
    base_errors = {name: pair_errors(predict(test), test.target, std) for name, predict in predictors.items()}
    for name in baselines:
        baselines[name]["std_mse"] = float(base_errors[name].mean())
    per_step[-1]["std_mse"] = float(trm_errors.mean())
    val_errors = {
        name: float(pair_errors(predict(val), val.target, std).mean()) for name, predict in predictors.items()
    }
    best = min(val_errors, key=lambda name: val_errors[name])  # chosen on val, judged on test
    reps = cfg.evaluate.bootstrap
    diff, low, high = paired_bootstrap(base_errors[best].tolist(), trm_errors.tolist(), reps, cfg.runtime.seed)
    trm_verdict = verdict(low, high)
    ablation_row: dict[str, Any] | None = None
    ablation_test: dict[str, Any] | None = None
    ablation_verdict = "indistinguishable"
    if t.recursion_ablation:
        ablation_row, ablation_errors = _recursion_ablation(
            cfg, data, target_mean, std, halt_threshold, head, device, test
        )
        a_diff, a_low, a_high = paired_bootstrap(ablation_errors.tolist(), trm_errors.tolist(), reps, cfg.runtime.seed)
        ablation_verdict = verdict(a_low, a_high)
        ablation_test = {"difference": a_diff, "ci_low": a_low, "ci_high": a_high, "verdict": ablation_verdict}
    fidelity = target_distribution(head, test.target)
    if fidelity is not None:
        fidelity["top_token"] = token_texts(cfg.model, cfg.runtime, [fidelity["top_token_id"]])[0]

    rows = [{"name": f"baseline: {name}", **values} for name, values in baselines.items()]
    rows += [{"name": f"TRM step {row['step']}" + (" (EMA)" if ema else ""), **row} for row in per_step]
    rows.append({"name": f"TRM step {t.n_supervision} (raw weights)", **raw})
    if ablation_row is not None:
        rows.append({"name": "ablation: T=1, n=1, N_sup=1 (same network, same pairs)", **ablation_row})
    n_test = data.count("test")
    word = {"better": "BEATS", "worse": "is WORSE than", "indistinguishable": "is NOT distinguishable from"}
    verdict_text = (
        f"Verdict (deciding metric: per-pair MSE of standardized targets, the training objective; paired "
        f"bootstrap over the {n_test} test pairs): the TRM (last step) {word[trm_verdict]} the best baseline, "
        f"{best} (chosen on val): error difference (baseline - TRM) {diff:+.4g}, 95% interval "
        f"[{low:+.4g}, {high:+.4g}]. For reading only: R² against the training mean, TRM "
        f"{per_step[-1]['r2']:.4f} vs {best} {baselines[best]['r2']:.4f}."
    )
    if ablation_test is not None:
        verdict_text += (
            f"\n\nRecursion ablation (error difference ablation - TRM {ablation_test['difference']:+.4g}, 95% "
            f"interval [{ablation_test['ci_low']:+.4g}, {ablation_test['ci_high']:+.4g}]): the recursion "
            + {
                "better": "helps.",
                "worse": "hurts (the one-pass network is better).",
                "indistinguishable": "makes no detectable difference.",
            }[ablation_verdict]
        )
    fidelity_text = ""
    if fidelity is not None:
        fidelity_text = (
            f"\n\nLM-head fidelity: the LM head of the test targets puts token {fidelity['top_token']} (id "
            f"{fidelity['top_token_id']}) first "
            f"for {fidelity['top_token_share']:.0%} of pairs ({fidelity['distinct_top_tokens']} distinct first "
            f"tokens; mean next-token entropy {fidelity['entropy_nats']:.3f} nats): this is the token that follows "
            f"`</think>`. Mean baseline: top-1 {baselines['mean'].get('lm_top1', float('nan')):.3f}, KL "
            f"{baselines['mean'].get('lm_kl', float('nan')):.4g}; "
            f"TRM: top-1 {per_step[-1].get('lm_top1', float('nan')):.3f}, "
            f"KL {per_step[-1].get('lm_kl', float('nan')):.4g}."
            + (
                " The target distribution is NEAR-CONSTANT: LM-head top-1 agreement says little here (a constant "
                "predictor already matches it)."
                if fidelity["near_constant"]
                else ""
            )
        )
    report = (
        f"# TRM on held-out test pairs ({n_test} test / {data.count('train')} train)\n\n"
        + markdown_table(rows, COLUMNS)
        + f"\n\n{verdict_text}{fidelity_text}\n\nstd_mse = per-pair MSE of standardized targets (training "
        "objective); r2 = 1 - SSE / sum of squares around the TRAINING mean (the mean baseline scores 0); "
        "r2_heldout_mean uses the test mean.\n\n"
        f"Ridge λ = {chosen['ridge_lambda']}, kNN k = {int(chosen['knn_k'])} (chosen on val). "
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
        "beats_best_baseline": trm_verdict == "better",
        "verdict": {
            "metric": "std_mse",
            "best_baseline": best,
            "difference": diff,
            "ci_low": low,
            "ci_high": high,
            "verdict": trm_verdict,
            "n": n_test,
        },
        "recursion_ablation": {"metrics": ablation_row, **(ablation_test or {})} if ablation_row else None,
        "target_distribution": fidelity,
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
    with stage_writer(cfg, store, STAGE, key, upstream) as w:
        w.write_bytes("model.safetensors", weights)
        w.write_json("config.json", trm_kwargs(cfg, data.d_prime))
        w.write_bytes("report.md", report.encode())
        w.write_bytes("per_step.png", _plot(per_step, baselines))
        manifest = w.commit(summary)
    tracker.summary({f"test/{k}": v for k, v in per_step[-1].items()})
    tracker.finish()
    CheckpointManager(store, STAGE, key).clear()
    return manifest


def _recursion_ablation(
    cfg: PipelineConfig,
    data: PairData,
    target_mean: torch.Tensor,
    std: torch.Tensor,
    halt_threshold: float,
    head: Head | None,
    device: torch.device,
    test: Features,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The same network with T=1, n=1, N_sup=1, trained on the same pairs: its test metrics and per-pair errors."""
    t = cfg.trm
    ablated = t.model_copy(update={"n_latent": 1, "t_recursions": 1, "n_supervision": 1})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        model = SequenceTRM(**{**trm_kwargs(cfg, data.d_prime), "n_latent": 1, "t_recursions": 1})
        model.set_normalization(*input_statistics(data), target_mean, std)
        _, ema = train_trm(
            model, data, ablated, seed=cfg.runtime.seed, device=device, halt_threshold=halt_threshold,
            halt_quantile=t.halt_quantile, target_mean=target_mean,
        )  # fmt: skip
    final = ema.module if ema is not None else model
    assert isinstance(final, SequenceTRM)
    predictions = final_predictions(final, data, "test", 1, eval_batch_size(t.batch_size), device)
    metrics = _metrics(predictions, test.target, target_mean, head)
    errors = pair_errors(predictions, test.target, std)
    metrics["std_mse"] = float(errors.mean())
    return metrics, errors


def run_upstream_pairs(cfg: PipelineConfig, store: ArtifactStore) -> Manifest:
    """problems -> 1a -> datagen -> 1b -> pairs without Prefect (the graph: llm_trm_core/stages/graph.py)."""
    from llm_trm_core.stages.graph import plain_call, through_pairs

    return Manifest.model_validate(through_pairs(plain_call(store), cfg)["pairs"])
