"""Stage `evaluate`: end-task accuracy on held-out test problems, every arm on the same problems.

Arms (greedy decoding, same answer budget; `evaluate.arms`, docs/evaluation.md):
- no_think: the no-think prompt, answer directly (LM only: LoRA adapters off);
- think: the think-mode prompt, full chain of thought (thinking budget + answer budget), graded on the text
  after `</think>` only: a trace the budget cut before `</think>` is wrong and counted (LM only, adapters off);
- trm_latent: no-think prompt + k TRM latents injected before the answer;
- random_latent: the same with random vectors of the TRM latents' norms (control);
- mean_latent: the projector applied to the TRM's mean output over training questions, the same for every
  question (control: what the latents carry that does not depend on the question);
- shuffled_latent: the TRM outputs of other test questions (seeded derangement) (control: question-specific?);
- original_style: the decompressed TRM output replaces the state at `</think>` (sets the first answer token).
Accuracy = exact numeric match (answer module) with a 95% Wilson interval per arm; the reference arm
(`evaluate.reference`, default trm_latent) is compared with every other arm by a paired bootstrap interval
of the accuracy difference over the same problems, and the verdict (better / worse / indistinguishable) is
read from that interval only (`llm_trm_core/stats.py`). Each report states the smallest difference its
sample can detect.

After GRPO, the same stage runs with the GRPO weights and the evaluation made before GRPO: the LM-only
arms (no_think, think) are taken from it (they run without adapters, so GRPO cannot change them), the
mean_latent arm's mean output is GRPO's TRM run on the TRM inputs the latent stage kept for its training
questions (the LM does not run them again), and the report adds a before/after table with paired bootstrap
intervals of the change, problem by problem.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.answers import grade
from llm_trm_core.data.problems import Problem, read_problems
from llm_trm_core.errors import UserError
from llm_trm_core.latent.artifacts import build_reasoner, check_lineage, load_grpo, load_latent, load_mean_inputs
from llm_trm_core.latent.reasoner import LATENT_ARMS, LatentReasoner, adapters_off
from llm_trm_core.launch import share_of
from llm_trm_core.lm.prefix import KEPT_PREFIX_BYTES, generate_after, prefill
from llm_trm_core.lm.tokens import cut_at_eos
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.stats import change_row, compare, derangement, min_detectable_difference, wilson_interval
from llm_trm_core.store import ArtifactStore, Manifest
from llm_trm_core.training.checkpoints import CheckpointManager

logger = logging.getLogger(__name__)

STAGE = "evaluate"
ARMS = ("no_think", "think", "trm_latent", "random_latent", "mean_latent", "shuffled_latent", "original_style")
COLUMNS = ("arm", "accuracy", "ci_low", "ci_high", "accuracy_strict", "tokens_per_answer", "seconds_per_answer", "n")
COMPARISON_COLUMNS = (
    "reference", "other", "ref_acc", "other_acc", "difference", "ci_low", "ci_high", "verdict", "discordant",
    "min_detectable", "n",
)  # fmt: skip
CHANGE_COLUMNS = ("arm", "before", "after", "change", "change_ci_low", "change_ci_high", "n")
LM_ONLY_ARMS = ("no_think", "think")


def bootstrap_ci(correct: Sequence[float], reps: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over problems (kept for callers; arms use Wilson)."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no results to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(reps, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarize_arm(arm: str, graded: list[dict[str, Any]], reps: int = 0, seed: int = 0) -> dict[str, Any]:
    """Accuracy with its 95% Wilson interval (`reps`, `seed`: unused, kept for the signature)."""
    correct = [bool(g["correct"]) for g in graded]
    low, high = wilson_interval(sum(correct), len(correct))
    row = {
        "arm": arm,
        "accuracy": float(np.mean(correct)),
        "ci_low": low,
        "ci_high": high,
        "accuracy_strict": float(np.mean([g["strict"] for g in graded])),
        "tokens_per_answer": float(np.mean([g["tokens"] for g in graded])),
        "seconds_per_answer": float(np.mean([g["seconds"] for g in graded])),
        "n": len(graded),
    }
    if any("finished" in g for g in graded):
        row["unfinished"] = sum(1 for g in graded if not g.get("finished", True))
    return row


def comparisons(results: dict[str, list[dict[str, Any]]], reference: str, reps: int, seed: int) -> list[dict[str, Any]]:
    """The reference arm against every other arm: paired bootstrap of the accuracy difference, verdict."""
    if reference not in results:
        raise UserError(f"the reference arm {reference!r} was not run (arms: {', '.join(results)})")
    ref = [bool(r["correct"]) for r in results[reference]]
    out = []
    for arm, rows in results.items():
        if arm == reference:
            continue
        c = compare(reference, ref, arm, [bool(r["correct"]) for r in rows], reps, seed)
        out.append({**c.row(), "sentence": c.sentence()})
    return out


def power_sentence(n: int, rows: list[dict[str, Any]]) -> str:
    """The smallest paired difference this sample can detect (80% power, two-sided alpha 0.05)."""
    worst = min_detectable_difference(n)
    observed = [r["min_detectable"] for r in rows]
    return (
        f"Power: with n={n} problems a paired difference must be about {worst:.3f} (worst case, every problem "
        f"discordant) to be detected with 80% power at alpha 0.05"
        + (f"; at the discordance observed here, {min(observed):.3f} to {max(observed):.3f}. " if observed else ". ")
        + "A smaller true difference will usually read as 'indistinguishable'."
    )


def think_answer(ids: list[int], end_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The answer tokens after the last `</think>` of a think-arm generation, and whether the span closed."""
    n = len(end_ids)
    for start in range(len(ids) - n, -1, -1):
        if tuple(ids[start : start + n]) == tuple(end_ids):
            return ids[start + n :], True
    return [], False


def _think_answers(reasoner: LatentReasoner, questions: list[str], budget: int) -> list[list[int]]:
    """Greedy think-mode generations (token ids, EOS cut) within `budget` new tokens, decoded with
    `llm_trm_core/lm/decode.py` (a row leaves the batch when it ends, so traces that stop early cost no more steps)."""
    lm = reasoner.lm
    tok = lm.tokenizer
    pad = int(tok.pad_token_id or 0)
    ids = [list(tok(lm.chat.prompt(q, enable_thinking=True), add_special_tokens=False).input_ids) for q in questions]
    with torch.no_grad():
        out = generate_after(lm.model, prefill(lm.model, ids, pad), None, budget, int(tok.eos_token_id), pad)
    return [cut_at_eos(row.tolist(), tok.eos_token_id)[0] for row in out.cpu()]


def answer_arms(
    reasoner: LatentReasoner,
    cfg: PipelineConfig,
    test: Sequence[Problem],
    arms: list[str],
    think_budget: int,
    train_questions: list[str],
    checkpoints: CheckpointManager | None = None,
    chosen: Collection[int] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every arm's graded answers on `test`, in its order (`train_questions`: for mean_latent's mean output).
    Questions go in chunks of similar length (`evaluate.batch_size`, less padding); per chunk the prompts are
    encoded and the TRM run once, and the prompt is prefilled once for every arm that continues it
    (`LatentReasoner.generate_arms`). With `checkpoints`, every finished chunk is committed to the store as
    its own checkpoint (step = chunk number), and a rerun decodes only the chunks not committed: the random
    arm's generator is advanced over every chunk in order, decoded or not, so each chunk draws the same
    noise whichever run decodes it. `chosen`: decode and commit only these chunks (0-based; a fanned-out
    range run or one rank's share of it, `run_evaluate_chunks`); the result then holds only what was decoded."""
    ev = cfg.evaluate
    tok = reasoner.lm.tokenizer
    end_ids = reasoner.lm.chat.delimiters.end_ids
    model: Any = reasoner.lm.model
    chunks = evaluation_chunks(test, ev.batch_size)
    needs_trm = any(a in arms for a in ("trm_latent", "random_latent", "shuffled_latent", "original_style"))
    committed = committed_chunks(checkpoints, arms, test, chunks) if checkpoints is not None else {}
    wanted = range(1, len(chunks) + 1) if chosen is None else {c + 1 for c in chosen}
    outputs = torch.zeros(len(test), reasoner.compressor.d_prime)
    encoded = []
    kept_bytes = 0
    with torch.no_grad():
        for number, chunk in enumerate(chunks, start=1):
            batch = reasoner.encode_prompts([test[i].question for i in chunk])
            if needs_trm:
                outputs[chunk] = reasoner.trm_output(batch).float().cpu()
            size = batch.prefix.nbytes if batch.prefix is not None else 0
            if number in committed or number not in wanted or kept_bytes + size > KEPT_PREFIX_BYTES:
                batch.prefix = None  # memory stays bounded in the number of problems: prefilled again below
            else:
                kept_bytes += size  # the same prefill the decoding would make: kept instead of repeated
            encoded.append(batch)
    if "mean_latent" in arms and reasoner.mean_output is None:  # else the latent artifact's, same questions
        if not train_questions:
            raise UserError("the mean_latent arm needs train problems (the TRM's mean output over them)")
        reasoner.fit_mean_output(train_questions, ev.batch_size)
    shuffled = outputs[derangement(len(test), cfg.runtime.seed)] if "shuffled_latent" in arms else outputs
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    results: dict[str, list[dict[str, Any] | None]] = {arm: [None] * len(test) for arm in arms}
    for number, records in committed.items():
        for arm in arms:
            for i, kept in zip(chunks[number - 1], records[arm], strict=True):
                results[arm][i] = kept
    if committed:
        logger.info("evaluate: resuming after %d/%d committed chunks", len(committed), len(chunks))
    arm_of = {"no_think": "no_latent"}
    continued = [a for a in arms if a in ("no_think", *LATENT_ARMS)]
    for done, (chunk, batch) in enumerate(zip(chunks, encoded, strict=True), start=1):
        answers: dict[str, list[list[int]]] = {}
        seconds: dict[str, float] = {}
        with torch.no_grad():
            latents = {
                arm: reasoner.arm_latents(
                    arm_of.get(arm, arm),  # type: ignore[arg-type]
                    len(chunk),
                    (shuffled if arm == "shuffled_latent" else outputs)[chunk],
                    generator,
                )
                for arm in continued
            }
        if done in committed or done not in wanted:  # the generator has drawn this chunk's noise all the same
            continue
        if continued:
            answers, seconds = reasoner.generate_arms(batch, latents, ev.max_answer_tokens, lm_only=LM_ONLY_ARMS)
        if "original_style" in arms:
            began = time.perf_counter()
            answers["original_style"] = reasoner.generate_original_style(batch, ev.max_answer_tokens, outputs[chunk])
            seconds["original_style"] = (time.perf_counter() - began) / len(chunk)
        if "think" in arms:
            began = time.perf_counter()
            with adapters_off(model):
                answers["think"] = _think_answers(reasoner, [test[i].question for i in chunk], think_budget)
            seconds["think"] = (time.perf_counter() - began) / len(chunk)
        for arm in arms:
            for i, ids in zip(chunk, answers[arm], strict=True):
                record: dict[str, Any] = {"id": test[i].id, "tokens": len(ids), "seconds": seconds[arm]}
                if arm == "think":  # graded on the answer after </think> only
                    ids, finished = think_answer(ids, end_ids)
                    record["finished"] = finished
                text = str(tok.decode(ids, skip_special_tokens=True))
                graded = grade(text, test[i].answer_value)
                record.update(
                    {"text": text, "correct": graded.numeric, "strict": graded.strict,
                     "extracted": graded.extracted.value}
                )  # fmt: skip
                results[arm][i] = record
        if checkpoints is not None and (chosen is not None or done < len(chunks)):
            checkpoints.save(done, {"arms": arms, "ids": [test[i].id for i in chunk],
                                    "records": {arm: [results[arm][i] for i in chunk] for arm in arms}})  # fmt: skip
        logger.info("evaluated %d/%d chunks of %d problems", done, len(chunks), len(test))
    return {arm: [r for r in rows if r is not None] for arm, rows in results.items()}


def evaluation_chunks(test: Sequence[Problem], batch_size: int) -> list[list[int]]:
    """The test problems' indexes in chunks of `batch_size`, shortest questions first (less padding)."""
    order = sorted(range(len(test)), key=lambda i: (len(test[i].question), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def committed_chunks(
    checkpoints: CheckpointManager, arms: list[str], test: Sequence[Problem], chunks: list[list[int]]
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Chunk number (1-based) -> each arm's records, for every chunk committed for these arms and problems
    (a checkpoint written for other arms, problems or batch size is not one of them: it is decoded again)."""
    out = {}
    for step in checkpoints.complete_steps():
        if not 1 <= step <= len(chunks):
            continue
        state = checkpoints.load(step)
        if state.get("arms") == arms and state.get("ids") == [test[i].id for i in chunks[step - 1]]:
            out[step] = state["records"]
    return out


def _plot(rows: list[dict[str, Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = [r["arm"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    err = [[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]]
    ax.bar(names, acc, yerr=err, capsize=4, color="#4477aa")
    ax.set_ylabel("accuracy (95% Wilson CI)")
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
    """`grpo`: evaluate the GRPO-trained policy; `before`: the evaluation of the same problems before GRPO.
    Chunks committed already (a preempted run, or fanned-out range runs: `run_evaluate_chunks`) are not
    decoded again."""
    upstream = evaluation_upstream(problems, compressor, trm, latent, grpo, before)
    key, manifest = cached(cfg, store, STAGE, upstream)
    if manifest is not None:
        return manifest
    ev = cfg.evaluate
    e = _prepare(cfg, store, key, problems, compressor, trm, latent, reasoner, grpo, before)
    test, arms, previous, reused = e.test, e.arms, e.previous, e.reused
    checkpoints = e.checkpoints
    results = answer_arms(e.reasoner, cfg, test, e.decoded, e.think_budget, e.train_questions, checkpoints)
    results = {arm: list(previous[arm]) if arm in reused else results[arm] for arm in arms}
    rows = [summarize_arm(arm, results[arm]) for arm in arms]
    compared = comparisons(results, ev.reference, ev.bootstrap, cfg.runtime.seed)
    title = "after GRPO" if grpo is not None else "before GRPO"
    report = evaluation_report(len(test), title, rows, compared, results, sorted(reused))
    change_rows = change_table(previous, results, ev.bootstrap, cfg.runtime.seed) if previous else []
    if change_rows:
        report += (
            "\n## Before vs after GRPO (same problems)\n\n"
            + markdown_table(change_rows, CHANGE_COLUMNS)
            + "\n\nchange_ci = 95% paired bootstrap interval of (after - before), resampling problems.\n"
        )
    with stage_writer(cfg, store, STAGE, key, upstream) as w:
        w.write_json("answers.json", results)
        w.write_bytes("report.md", report.encode())
        w.write_bytes("accuracy.png", _plot(rows))
        committed = w.commit(
            {
                "rows": rows,
                "arms": {r["arm"]: r for r in rows},
                "comparisons": compared,
                "reference": ev.reference,
                "n": len(test),
                "policy": title,
                "before_after": change_rows,
                "reused_arms": sorted(reused),
                "min_detectable_worst_case": min_detectable_difference(len(test)),
            }
        )
    checkpoints.clear()
    return committed


def evaluation_upstream(
    problems: Manifest,
    compressor: Manifest,
    trm: Manifest,
    latent: Manifest,
    grpo: Manifest | None = None,
    before: Manifest | None = None,
) -> dict[str, str]:
    upstream = {"problems": problems.key, "compressor": compressor.key, "trm": trm.key, "latent": latent.key}
    if grpo is not None:
        upstream["grpo"] = grpo.key
    if before is not None:
        upstream["before"] = before.key
    return upstream


def held_out_problems(cfg: PipelineConfig, store: ArtifactStore, problems: Manifest) -> list[Problem]:
    test = read_problems(store, problems).select_split("test", cfg.evaluate.num_problems)
    if not test:
        raise UserError("the problem set has no test problems to evaluate; raise problems.test_fraction")
    return list(test)


def evaluation_chunk_count(cfg: PipelineConfig, store: ArtifactStore, problems: Manifest) -> int:
    """How many chunks the evaluation of `problems` decodes (what a fan-out cuts into ranges): no model loaded."""
    return len(evaluation_chunks(held_out_problems(cfg, store, problems), cfg.evaluate.batch_size))


@dataclass
class _Evaluation:
    test: list[Problem]
    reasoner: LatentReasoner
    arms: list[str]
    previous: dict[str, list[dict[str, Any]]]
    reused: set[str]
    think_budget: int
    train_questions: list[str]
    checkpoints: CheckpointManager

    @property
    def decoded(self) -> list[str]:
        return [a for a in self.arms if a not in self.reused]


def _prepare(
    cfg: PipelineConfig,
    store: ArtifactStore,
    key: str,
    problems: Manifest,
    compressor: Manifest,
    trm: Manifest,
    latent: Manifest,
    reasoner: LatentReasoner | None,
    grpo: Manifest | None,
    before: Manifest | None,
) -> _Evaluation:
    """What decoding the evaluation under `key` needs: its problems, policy, arms and chunk checkpoints."""
    check_lineage(trm, compressor, store, latent)
    ev = cfg.evaluate
    test = held_out_problems(cfg, store, problems)
    if grpo is not None and grpo.upstream.get("latent") != latent.key:
        raise UserError(
            f"the GRPO artifact {grpo.uri} started from latent {grpo.upstream.get('latent')}, not {latent.key}"
        )
    if before is not None and (before.upstream.get("problems") != problems.key or "grpo" in before.upstream):
        raise UserError(f"the 'before' evaluation {before.uri} is not a pre-GRPO evaluation of problems {problems.key}")
    reasoner = load_latent(store, latent, reasoner or build_reasoner(cfg, store, compressor, trm))
    same_questions = latent.upstream.get("problems") == problems.key
    if not same_questions:
        reasoner.mean_output = None  # fitted on another problem set's training questions: fit again
    if grpo is not None:
        reasoner = load_grpo(store, grpo, reasoner)
    reasoner.trm.eval()
    arms = [a for a in ARMS if a in ev.arms]
    refit = "mean_latent" in arms and same_questions and reasoner.mean_output is None
    mean_inputs = load_mean_inputs(store, latent) if refit else None
    if mean_inputs is not None:  # GRPO's TRM on the latent stage's kept TRM inputs: the LM need not run
        reasoner.fit_mean_output_from(mean_inputs, ev.batch_size)
    previous: dict[str, list[dict[str, Any]]] = {}
    if before is not None:
        previous = json.loads(store.open(STAGE, before.key).read_bytes("answers.json"))
        first = next(iter(previous.values()), [])
        if [r["id"] for r in first] != [p.id for p in test]:
            raise UserError(
                f"the 'before' evaluation {before.uri} covers other problems; evaluate.num_problems changed"
            )
    # LM-only arms run with adapters off, so GRPO (LoRA or not) cannot change them: reuse them
    reused = {a for a in LM_ONLY_ARMS if a in arms and a in previous}
    think_budget = (ev.think_tokens or cfg.datagen.max_new_tokens) + ev.max_answer_tokens
    train_questions = [
        p.question for p in read_problems(store, problems).select_split("train", cfg.latent.num_problems)
    ]
    checkpoints = CheckpointManager(store, STAGE, key, keep_last=0)  # one per chunk, cleared after the commit
    return _Evaluation(test, reasoner, arms, previous, reused, think_budget, train_questions, checkpoints)


def run_evaluate_chunks(
    cfg: PipelineConfig,
    store: ArtifactStore,
    problems: Manifest,
    compressor: Manifest,
    trm: Manifest,
    latent: Manifest,
    first: int,
    end: int,
    grpo: Manifest | None = None,
    before: Manifest | None = None,
    share: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Decode and commit evaluation chunks `first`..`end`-1 (those not committed yet) of the evaluation
    `run_evaluate` commits for the same arguments: the unit of work of one fanned-out run. `share` = (rank,
    ranks): only every ranks-th chunk of the range from its rank-th (one local process's share,
    llm_trm_core/stages/spread.py). `run_evaluate` then finds them committed and writes the artifact.
    Returns what was done."""
    upstream = evaluation_upstream(problems, compressor, trm, latent, grpo, before)
    key, manifest = cached(cfg, store, STAGE, upstream)
    if manifest is not None:
        return {"key": key, "chunks": [], "committed": True}
    count = evaluation_chunk_count(cfg, store, problems)
    if not 0 <= first < end <= count:
        raise UserError(f"evaluation chunk range {first}..{end - 1} is outside this evaluation's chunks 0..{count - 1}")
    chosen = share_of(range(first, end), share)
    if not chosen:  # more ranks than chunks
        return {"key": key, "chunks": [], "committed": False}
    e = _prepare(cfg, store, key, problems, compressor, trm, latent, None, grpo, before)
    answer_arms(e.reasoner, cfg, e.test, e.decoded, e.think_budget, e.train_questions, e.checkpoints, chosen)
    return {"key": key, "chunks": chosen, "committed": False}


def evaluation_report(
    n: int,
    title: str,
    rows: list[dict[str, Any]],
    compared: list[dict[str, Any]],
    results: dict[str, list[dict[str, Any]]],
    reused: list[str],
) -> str:
    think = results.get("think")
    unfinished = sum(1 for r in think if not r.get("finished", True)) if think else 0
    lines = [
        f"# End-task accuracy on {n} held-out test problems ({title})\n",
        markdown_table(rows, COLUMNS),
        "\nAccuracy = exact numeric match of the extracted answer; ci = 95% Wilson interval of the arm alone "
        "(for reading one arm, not for comparing two).",
    ]
    if think is not None:
        lines.append(
            f"The think arm is graded on the text after `</think>` only; {unfinished}/{len(think)} traces hit the "
            "thinking budget without closing the span and count as wrong."
        )
    lines.append("The LM-only arms (no_think, think) run with any LoRA adapters off: they are the plain LM.")
    if reused:
        lines.append(f"Reused from the evaluation before GRPO (unchanged by it): {', '.join(reused)}.")
    if compared:
        lines += [
            f"\n## Paired comparisons with {compared[0]['reference']} (same problems)\n",
            markdown_table(compared, COMPARISON_COLUMNS),
            "\ndifference = reference accuracy - other accuracy; ci = 95% paired bootstrap interval resampling "
            "problems; verdict: better if the interval is above 0, worse if below, else indistinguishable.\n",
            *[f"- {c['sentence']}" for c in compared],
            "",
            power_sentence(n, compared),
        ]
    return "\n".join(lines) + "\n"


def change_table(
    before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]], reps: int, seed: int
) -> list[dict[str, Any]]:
    """Per arm run both times: accuracy before, after, and a paired bootstrap interval of the change."""
    return [
        change_row(arm, [r["correct"] for r in before[arm]], [r["correct"] for r in after[arm]], reps, seed)
        for arm in ARMS
        if arm in before and arm in after
    ]
