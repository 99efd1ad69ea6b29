"""Stage `evaluate`: end-task accuracy on held-out test problems, every arm on the same problems.

Arms (greedy decoding, same answer budget):
- no_think: the no-think prompt, answer directly;
- think: the think-mode prompt, full chain of thought (thinking budget + answer budget);
- trm_latent: no-think prompt + k TRM latents injected before the answer;
- random_latent: the same with random vectors of the TRM latents' norms (control);
- original_style: the decompressed TRM output replaces the state at `</think>` (sets the first answer token).
Accuracy = exact numeric match (answer module), with a 95% bootstrap interval over problems; also strict
(`#### N`) accuracy, generated tokens and wall time per answer.

After GRPO, the same stage runs with the GRPO weights and the evaluation made before GRPO: the LM-only
arms (no_think, think) are taken from it when GRPO left the LM untouched (no LoRA), and the report adds
a before/after table with paired bootstrap intervals of the change, problem by problem.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.answers import grade
from llm_trm_core.errors import UserError
from llm_trm_core.latent.reasoner import LatentReasoner
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.keys import STAGE_CODE_VERSIONS, key_for, stage_config
from llm_trm_core.stages.latent import build_reasoner, check_lineage, load_latent
from llm_trm_core.stages.problems import read_problems
from llm_trm_core.store import ArtifactStore, Manifest

logger = logging.getLogger(__name__)

STAGE = "evaluate"
ARMS = ("no_think", "think", "trm_latent", "random_latent", "original_style")
COLUMNS = ("arm", "accuracy", "ci_low", "ci_high", "accuracy_strict", "tokens_per_answer", "seconds_per_answer", "n")
CHANGE_COLUMNS = ("arm", "before", "after", "change", "change_ci_low", "change_ci_high", "n")
LM_ONLY_ARMS = ("no_think", "think")


def bootstrap_ci(correct: Sequence[float], reps: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over problems."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no results to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(reps, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize_arm(arm: str, graded: list[dict[str, Any]], reps: int, seed: int) -> dict[str, Any]:
    correct = [g["correct"] for g in graded]
    low, high = bootstrap_ci(correct, reps, seed)
    return {
        "arm": arm,
        "accuracy": float(np.mean(correct)),
        "ci_low": low,
        "ci_high": high,
        "accuracy_strict": float(np.mean([g["strict"] for g in graded])),
        "tokens_per_answer": float(np.mean([g["tokens"] for g in graded])),
        "seconds_per_answer": float(np.mean([g["seconds"] for g in graded])),
        "n": len(graded),
    }


def _think_answers(reasoner: LatentReasoner, questions: list[str], budget: int) -> list[list[int]]:
    lm = reasoner.lm
    tok = lm.tokenizer
    ids = [list(tok(lm.chat.prompt(q, enable_thinking=True), add_special_tokens=False).input_ids) for q in questions]
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), int(tok.pad_token_id or 0), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, seq in enumerate(ids):
        batch[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    model: Any = lm.model
    out = model.generate(
        input_ids=batch.to(reasoner.device), attention_mask=mask.to(reasoner.device), max_new_tokens=budget,
        do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    rows = [row[width:].tolist() for row in out.cpu()]
    return [r[: r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in rows]


def _plot(rows: list[dict[str, Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = [r["arm"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    err = [[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]]
    ax.bar(names, acc, yerr=err, capsize=4, color="#4477aa")
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(0, max(0.05, max(r["ci_high"] for r in rows) * 1.15))
    ax.set_title(f"held-out test problems (n={rows[0]['n']})")
    png = png_bytes(fig)
    plt.close(fig)
    return png


def run_evaluate(
    cfg: PipelineConfig,
    store: ArtifactStore,
    problems: Manifest,
    compressor: Manifest,
    trm: Manifest,
    latent: Manifest,
    reasoner: LatentReasoner | None = None,
    grpo: Manifest | None = None,
    before: Manifest | None = None,
) -> Manifest:
    """`grpo`: evaluate the GRPO-trained policy; `before`: the evaluation of the same problems before GRPO."""
    upstream = {"problems": problems.key, "compressor": compressor.key, "trm": trm.key, "latent": latent.key}
    if grpo is not None:
        upstream["grpo"] = grpo.key
    if before is not None:
        upstream["before"] = before.key
    key = key_for(cfg, STAGE, upstream)
    if (manifest := store.read_manifest(STAGE, key)) is not None:
        return manifest
    check_lineage(trm, compressor, store, latent)
    ev = cfg.evaluate
    test = read_problems(store, problems).select_split("test", ev.num_problems)
    if not test:
        raise UserError("the problem set has no test problems to evaluate; raise problems.test_fraction")
    if grpo is not None and grpo.upstream.get("latent") != latent.key:
        raise UserError(
            f"the GRPO artifact {grpo.uri} started from latent {grpo.upstream.get('latent')}, not {latent.key}"
        )
    if before is not None and (before.upstream.get("problems") != problems.key or "grpo" in before.upstream):
        raise UserError(f"the 'before' evaluation {before.uri} is not a pre-GRPO evaluation of problems {problems.key}")
    reasoner = load_latent(store, latent, reasoner or build_reasoner(cfg, store, compressor, trm))
    if grpo is not None:
        from llm_trm_core.stages.grpo import load_grpo

        reasoner = load_grpo(store, grpo, reasoner)
    reasoner.trm.eval()
    previous: dict[str, list[dict[str, Any]]] = {}
    if before is not None:
        previous = json.loads(store.open(STAGE, before.key).read_bytes("answers.json"))
        if [r["id"] for r in previous["no_think"]] != [p.id for p in test]:
            raise UserError(
                f"the 'before' evaluation {before.uri} covers other problems; evaluate.num_problems changed"
            )
    reused = (
        set(LM_ONLY_ARMS)
        if before is not None
        and (grpo is None or "lora.safetensors" not in store.open("grpo", grpo.key).manifest.files)
        else set()
    )
    tok = reasoner.lm.tokenizer
    think_budget = (ev.think_tokens or cfg.datagen.max_new_tokens) + ev.max_answer_tokens
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    runners: dict[str, Callable[[list[str]], list[list[int]]]] = {
        "no_think": lambda qs: reasoner.generate(qs, "no_latent", ev.max_answer_tokens),
        "think": lambda qs: _think_answers(reasoner, qs, think_budget),
        "trm_latent": lambda qs: reasoner.generate(qs, "trm_latent", ev.max_answer_tokens),
        "random_latent": lambda qs: reasoner.generate(qs, "random_latent", ev.max_answer_tokens, generator),
        "original_style": lambda qs: reasoner.generate_original_style(qs, ev.max_answer_tokens),
    }
    results: dict[str, list[dict[str, Any]]] = {arm: list(previous[arm]) if arm in reused else [] for arm in ARMS}
    for start in range(0, len(test), ev.batch_size):
        batch = test[start : start + ev.batch_size]
        questions = [p.question for p in batch]
        for arm in (a for a in ARMS if a not in reused):
            began = time.perf_counter()
            answers = runners[arm](questions)
            seconds = (time.perf_counter() - began) / len(batch)
            for problem, ids in zip(batch, answers, strict=True):
                text = str(tok.decode(ids, skip_special_tokens=True))
                graded = grade(text, problem.answer_value)
                results[arm].append(
                    {"id": problem.id, "text": text, "tokens": len(ids), "seconds": seconds,
                     "correct": graded.numeric, "strict": graded.strict, "extracted": graded.extracted.value}
                )  # fmt: skip
        logger.info("evaluated %d/%d problems", min(start + ev.batch_size, len(test)), len(test))
    rows = [summarize_arm(arm, results[arm], ev.bootstrap, cfg.runtime.seed) for arm in ARMS]
    title = "after GRPO" if grpo is not None else "before GRPO"
    report = (
        f"# End-task accuracy on {len(test)} held-out test problems ({title})\n\n"
        + markdown_table(rows, COLUMNS)
        + "\n\nAccuracy = exact numeric match of the extracted answer; "
        "95% percentile bootstrap interval over problems."
        + (
            f" Reused from the evaluation before GRPO (LM unchanged): {', '.join(sorted(reused))}.\n"
            if reused
            else "\n"
        )
    )
    change_rows = change_table(previous, results, ev.bootstrap, cfg.runtime.seed) if previous else []
    if change_rows:
        report += (
            "\n## Before vs after GRPO (same problems)\n\n"
            + markdown_table(change_rows, CHANGE_COLUMNS)
            + "\n\nchange_ci = 95% paired bootstrap interval of (after - before), resampling problems.\n"
        )
    with store.writer(
        STAGE, key, config=stage_config(cfg, STAGE), code_version=STAGE_CODE_VERSIONS[STAGE], upstream=upstream
    ) as w:
        w.write_json("answers.json", results)
        w.write_bytes("report.md", report.encode())
        w.write_bytes("accuracy.png", _plot(rows))
        return w.commit(
            {
                "rows": rows,
                "arms": {r["arm"]: r for r in rows},
                "n": len(test),
                "policy": title,
                "before_after": change_rows,
                "reused_arms": sorted(reused),
            }
        )


def change_table(
    before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]], reps: int, seed: int
) -> list[dict[str, Any]]:
    """Per arm: accuracy before, after, and a paired bootstrap interval of the change over the same problems."""
    return [
        change_row(arm, [r["correct"] for r in before[arm]], [r["correct"] for r in after[arm]], reps, seed)
        for arm in ARMS
    ]


def change_row(arm: str, before: Sequence[bool], after: Sequence[bool], reps: int, seed: int) -> dict[str, Any]:
    """Accuracy before and after on the same problems, with a paired bootstrap interval of the change."""
    old, new = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    low, high = bootstrap_ci((new - old).tolist(), reps, seed)
    return {
        "arm": arm, "before": float(old.mean()), "after": float(new.mean()), "change": float(new.mean() - old.mean()),
        "change_ci_low": low, "change_ci_high": high, "n": len(new),
    }  # fmt: skip
