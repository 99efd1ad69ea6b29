"""Stage 2 data: `datagen`.

Problems (`datagen.num_problems` of the problem set, drawn from train / val / test in proportion to their
sizes: `ProblemSet.select_stratified`, llm_trm_core/plan.py) are cut into shards of `datagen.shard_size`
by index; a larger count extends a smaller one, so a shard's index range always names the same problems.
Each shard is its own artifact (`datagen-shard`), so shards can be mapped over workers and a committed
shard is never redone. Inside a shard, every generate batch is published as a part named by its index
range (states first, rows last); a shard that was killed resumes at the end of its last complete part:
no duplicates, no gaps. The `datagen` artifact then aggregates the shards into a report (success rate,
problems per split, failure and end-of-span breakdown, think-mode accuracy, thinking-length histogram).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.parquet as pq

from llm_trm_core.arrow import STATE_WRITE_OPTIONS, TABLE_WRITE_OPTIONS, adopt_parquet
from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.problems import Problem, read_problems
from llm_trm_core.datagen.artifacts import SHARD_STAGE, iter_shard_rows
from llm_trm_core.datagen.generate import ThinkingGenerator
from llm_trm_core.datagen.records import pairs_to_table, parse_part, part_name, rows_table
from llm_trm_core.errors import ArtifactCorruptError, UserError
from llm_trm_core.faults import kill_if_requested
from llm_trm_core.hidden_states import resolve_layer
from llm_trm_core.lm import LoadedLM, shared_language_model, token_texts
from llm_trm_core.reporting import markdown_table, png_bytes
from llm_trm_core.stages.keys import key_for
from llm_trm_core.stages.publish import cached, stage_writer
from llm_trm_core.store import ArtifactStore, ArtifactWriter, Manifest

logger = logging.getLogger(__name__)

STAGE = "datagen"
FAILURE_REASONS = ("no_start", "no_end", "truncated")


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int  # first problem index (inclusive)
    end: int  # last problem index (exclusive)


def datagen_problems(store: ArtifactStore, problems: Manifest, cfg: PipelineConfig) -> list[Problem]:
    problem_set = read_problems(store, problems)
    if not problem_set.problems:
        raise UserError("the problem set is empty; check the problems stage")
    return problem_set.select_stratified(cfg.datagen.num_problems)


def plan_shards(cfg: PipelineConfig, n_problems: int) -> list[ShardSpec]:
    size = cfg.datagen.shard_size
    return [ShardSpec(i, start, min(start + size, n_problems)) for i, start in enumerate(range(0, n_problems, size))]


def shard_extra(shard: ShardSpec) -> dict[str, int]:
    """What a shard's key and config view add to the datagen config: which problems it covers."""
    return {"shard": shard.index, "start": shard.start, "end": shard.end}


def shard_key(cfg: PipelineConfig, problems: Manifest, shard: ShardSpec) -> str:
    return key_for(cfg, SHARD_STAGE, {"problems": problems.key}, shard_extra(shard))


def _completed_parts(writer: ArtifactWriter, shard: ShardSpec) -> int:
    """Adopt the contiguous parts an earlier attempt published; return the next problem index to process."""
    fs = writer.store.fs
    folder = writer.store.path(SHARD_STAGE, writer.key)
    parts = sorted(
        (span, name)
        for name in (str(p).rsplit("/", 1)[-1] for p in fs.glob(f"{folder}/rows/part-*.parquet"))
        if (span := parse_part(name)) is not None
    )
    position = shard.start
    for (start, end), name in parts:
        if start != position or not fs.exists(f"{folder}/states/{name}"):
            logger.warning(
                "shard %d: part %s is not contiguous with index %d; it will be redone", shard.index, name, position
            )
            break
        try:  # page checksums verified before a part is adopted (llm_trm_core.arrow.adopt_parquet)
            adopt_parquet(writer, f"states/{name}")
            adopt_parquet(writer, f"rows/{name}")
        except ArtifactCorruptError as exc:
            logger.warning("shard %d: part %s is damaged (%s); it will be redone", shard.index, name, exc)
            writer.files.pop(f"states/{name}", None)
            break
        position = end
    if position > shard.start:
        logger.info(
            "shard %d: resuming at problem index %d (%d already done)", shard.index, position, position - shard.start
        )
    return position


def run_datagen_shard(
    cfg: PipelineConfig,
    store: ArtifactStore,
    problems: Manifest,
    shard: ShardSpec,
    lm: LoadedLM | None = None,
) -> Manifest:
    key, manifest = cached(cfg, store, SHARD_STAGE, {"problems": problems.key}, shard_extra(shard))
    if manifest is not None:
        return manifest
    start_time = time.perf_counter()
    items = datagen_problems(store, problems, cfg)[shard.start : shard.end]
    lm = lm or shared_language_model(cfg.model, cfg.runtime)
    layer_index = resolve_layer(cfg.compressor.layer, lm.info.num_layers)
    generator = ThinkingGenerator(lm, cfg.datagen, layer_index)
    state_meta = {"model": lm.info.name, "layer": str(cfg.compressor.layer), "hidden_size": str(lm.info.hidden_size)}
    writer = stage_writer(cfg, store, SHARD_STAGE, key, {"problems": problems.key}, shard_extra(shard))
    position = _completed_parts(writer, shard)
    batch = cfg.datagen.batch_size
    for parts_written, first in enumerate(range(position, shard.end, batch), start=1):
        last = min(first + batch, shard.end)
        chunk = [(first + i, problem) for i, problem in enumerate(items[first - shard.start : last - shard.start])]
        rows, pairs = generator.run_batch(chunk, cfg.runtime.seed)
        name = part_name("", first, last).lstrip("/")
        with writer.open(f"states/{name}") as f:
            table = pairs_to_table(pairs, lm.info.hidden_size, cfg.compressor.cache_dtype, state_meta)
            pq.write_table(table, f, **STATE_WRITE_OPTIONS)
        with writer.open(f"rows/{name}") as f:  # written last: a part exists once its rows exist
            pq.write_table(rows_table(rows), f, **TABLE_WRITE_OPTIONS)
        logger.info("shard %d: problems %d-%d done (%d pairs)", shard.index, first, last, len(pairs))
        kill_if_requested("datagen-part", parts_written)
    rows = list(iter_shard_rows(writer, writer.files))
    return writer.commit(
        {
            "shard": shard.index,
            "problems": len(rows),
            "succeeded": sum(r["failure"] is None for r in rows),
            "model": lm.info.as_dict(),
            "seconds": round(time.perf_counter() - start_time, 2),
        }
    )


def _histogram(lengths: list[int], budget: int) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(lengths or [0], bins=min(30, max(5, len(set(lengths)))), color="#4477aa")
    ax.axvline(budget, color="grey", ls=":", lw=1, label=f"budget {budget}")
    ax.set_xlabel("thinking tokens (delimiters included)")
    ax.set_ylabel("problems")
    ax.set_title(f"thinking length, {len(lengths)} closed spans")
    ax.legend()
    png = png_bytes(fig)
    plt.close(fig)
    return png


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    ok = [r for r in rows if r["failure"] is None]
    failures = Counter(
        r["failure"] if r["failure"] in FAILURE_REASONS else "error" for r in rows if r["failure"] is not None
    )
    lengths = sorted(int(r["think_tokens"]) for r in ok)
    return {
        "problems": n,
        "succeeded": len(ok),
        "success_rate": len(ok) / n if n else 0.0,
        "failures": {reason: failures.get(reason, 0) for reason in (*FAILURE_REASONS, "error")},
        "end_sources": dict(Counter(r["end_source"] for r in ok)),
        "closed_by_model_rate": sum(r["end_source"] != "budget" for r in ok) / n if n else 0.0,
        "think_accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
        "think_accuracy_strict": sum(r["correct_strict"] for r in rows) / n if n else 0.0,
        "think_accuracy_closed_spans": sum(r["correct"] for r in ok) / len(ok) if ok else 0.0,
        "think_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0,
        "think_tokens_median": lengths[len(lengths) // 2] if lengths else 0,
        "splits": dict(Counter(r["split"] for r in ok)),
        "problems_per_split": dict(Counter(r["split"] for r in rows)),
    }


def tokens_after_span(cfg: PipelineConfig, rows: list[dict[str, Any]], top: int = 5) -> dict[str, Any]:
    """Which token follows the thinking span in the successful traces (the first answer token; `(none)` when
    the answer is empty): the `top` most frequent with their text and share, and the entropy in nats."""
    counts = Counter(int(r["answer_ids"][0]) if len(r["answer_ids"]) else -1 for r in rows if r["failure"] is None)
    total = sum(counts.values())
    common = counts.most_common(top)
    ids = [i for i, _ in common if i >= 0]
    text = dict(zip(ids, token_texts(cfg.model, cfg.runtime, ids), strict=True)) | {-1: "(none)"}
    shown = [{"id": i, "text": text[i], "share": c / total} for i, c in common]
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0
    return {"spans": total, "top": shown, "entropy_nats": entropy}


def run_datagen_report(
    cfg: PipelineConfig, store: ArtifactStore, problems: Manifest, shards: list[Manifest]
) -> Manifest:
    upstream = {"problems": problems.key, **{f"shard-{m.metrics['shard']:04d}": m.key for m in shards}}
    key, manifest = cached(cfg, store, STAGE, upstream)
    if manifest is not None:
        return manifest
    rows = [
        row
        for m in sorted(shards, key=lambda m: m.metrics["shard"])
        for row in iter_shard_rows(store.open(SHARD_STAGE, m.key), m.files)
    ]
    summary = summarize(rows)
    errors = Counter(r["failure"] for r in rows if r["failure"] and r["failure"].startswith("error"))
    table = [{"metric": k, "value": v} for k, v in summary.items() if not isinstance(v, dict)]
    table += [{"metric": f"failure: {k}", "value": v} for k, v in summary["failures"].items()]
    table += [{"metric": f"end of span: {k}", "value": v} for k, v in summary["end_sources"].items()]
    report = "# Thinking generation\n\n" + markdown_table(table) + "\n"
    if errors:
        report += "\nErrors:\n\n" + "\n".join(f"- {count} × {message}" for message, count in errors.items()) + "\n"
    following = tokens_after_span(cfg, rows)
    if following["spans"]:
        summary["token_after_span"] = following
        shown = ", ".join(f"{t['text']} {t['share']:.0%}" for t in following["top"])
        report += (
            f"\nToken after the thinking span in the traces (the post state's next token, what its LM head should "
            f"predict), over {following['spans']} spans: {shown}; entropy {following['entropy_nats']:.3f} nats.\n"
        )
    lengths = [int(r["think_tokens"]) for r in rows if r["failure"] is None]
    with stage_writer(cfg, store, STAGE, key, upstream) as w:
        w.write_bytes("report.md", report.encode())
        w.write_bytes("think_length.png", _histogram(lengths, cfg.datagen.max_new_tokens))
        w.write_json("summary.json", summary)
        return w.commit(summary)
