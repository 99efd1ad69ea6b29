"""The pipeline's stages, each declared once (docs/architecture.md, "Declaring a stage").

Everything keyed, scheduled, published or offered on the command line for a stage comes from its
`Stage` here: `llm_trm_core/stages/keys.py` derives the store-key tables, `tasks/caching.py` the
Prefect cache mapping, `tasks/stage.py` the Prefect tasks, `llm_trm_core/stages/graph.py` the graph
without Prefect. Bump a stage's `version` in the commit that changes its outputs.
"""

from __future__ import annotations

from typing import Any

from llm_trm_core.config import PipelineConfig
from llm_trm_core.data.files import fingerprint, list_files
from llm_trm_core.errors import ArtifactError
from llm_trm_core.launch import in_torchrun, launch_stage
from llm_trm_core.reporting import fmt
from llm_trm_core.stages import evaluate, grpo, trm
from llm_trm_core.stages.compressor import Phase, run_basis, run_compressor, run_corpus_hiddens
from llm_trm_core.stages.datagen import ShardSpec, run_datagen_report, run_datagen_shard
from llm_trm_core.stages.declaration import Report, Stage, Table, declare
from llm_trm_core.stages.latent import run_latent
from llm_trm_core.stages.pairs import run_pairs, run_trace_hiddens
from llm_trm_core.stages.problems import run_problems
from llm_trm_core.stages.sweep import COLUMNS as SWEEP_COLUMNS
from llm_trm_core.stages.sweep import run_sweep_report
from llm_trm_core.store import ArtifactStore, Manifest

# ---------------------------------------------------------------------------------------------
# Views: what of a stage's config dump does not change its outputs


def _file_source(section: dict[str, Any], field: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """`path` matters only for source=file, and then so does what the files hold (their fingerprint)."""
    if section.get("source") != "file":
        return {k: v for k, v in section.items() if k != "path"}
    return {**section, "files": fingerprint(list_files(str(section["path"]), field, kinds))}


def problems_view(dumped: dict[str, Any]) -> dict[str, Any]:
    """Difficulty fields of the arithmetic source do not affect the other sources' problems."""
    section = dumped["problems"]
    if section.get("source") != "arithmetic":
        section = {k: v for k, v in section.items() if not k.startswith("arithmetic_")}
    dumped["problems"] = _file_source(section, "problems.path", ("parquet", "jsonl"))
    return dumped


def hiddens_view(dumped: dict[str, Any]) -> dict[str, Any]:
    corpus = dumped["corpus"]
    if corpus.get("max_doc_tokens") is None:  # no cap: the same states as before the field existed
        corpus = {k: v for k, v in corpus.items() if k != "max_doc_tokens"}
    dumped["corpus"] = _file_source(corpus, "corpus.path", ("parquet", "jsonl", "text"))
    return dumped


_SGD_ONLY = frozenset(
    {
        "batch_tokens", "grad_accum", "lr", "weight_decay", "epochs", "max_steps", "schedule", "warmup_steps",
        "decay_fraction", "min_lr_ratio", "grad_clip", "mixed_precision", "eval_every", "patience", "min_delta",
    }
)  # fmt: skip


def compressor_view(dumped: dict[str, Any]) -> dict[str, Any]:
    """A closed-form 1a compressor does not depend on the SGD hyper-parameters or the seed (1b always trains)."""
    section = dumped.get("compressor", {})
    if section.get("solver") == "closed_form" and dumped.get("phase", "1a") == "1a":
        dumped["compressor"] = {k: v for k, v in section.items() if k not in _SGD_ONLY}
        dumped.pop("runtime.seed", None)
    return dumped


def datagen_shard_view(dumped: dict[str, Any]) -> dict[str, Any]:
    """A shard is identified by its index range, so how many problems or shards there are does not matter."""
    dumped["datagen"] = {k: v for k, v in dumped["datagen"].items() if k not in ("num_problems", "shard_size")}
    return dumped


# ---------------------------------------------------------------------------------------------
# Run functions in the task-level signature (manifests positional, options by keyword)


def _compressor(
    cfg: PipelineConfig,
    store: ArtifactStore,
    hiddens: Manifest,
    basis: Manifest,
    *,
    phase: Phase = "1a",
    init: Manifest | None = None,
) -> Manifest:
    """With runtime.num_processes > 1, SGD of a 1a compressor runs under torchrun, as a child process that
    dies with this one (`llm-trm stage compressor` on every rank)."""
    if cfg.runtime.num_processes > 1 and phase == "1a" and cfg.compressor.solver == "sgd" and not in_torchrun():
        result = launch_stage("flows.cli", cfg, cfg.runtime.num_processes, args=("stage", "compressor"))
        committed = store.read_manifest("compressor", result["key"])
        if committed is None:
            raise ArtifactError(f"torchrun reported compressor {result['key']}, which is not committed")
        return committed
    return run_compressor(cfg, store, hiddens, basis, phase=phase, init=init)


def _datagen_shard(
    cfg: PipelineConfig, store: ArtifactStore, problems: Manifest, index: int, start: int, end: int
) -> Manifest:
    return run_datagen_shard(cfg, store, problems, ShardSpec(index, start, end))


# ---------------------------------------------------------------------------------------------
# Reports: summary lines and tables built from a manifest (published by tasks/stage.py, printed by the CLI)


def _trm_tables(manifest: Manifest) -> list[Table]:
    metrics = manifest.metrics
    rows = [{"name": f"baseline: {name}", **values} for name, values in metrics["baselines"].items()]
    rows += [{"name": f"TRM step {row['step']}", **row} for row in metrics["per_step"]]
    title = f"TRM per supervision step beside baselines (held-out test split, {metrics['pairs']['test']} pairs)"
    return [Table("trm-report", rows, title, trm.COLUMNS)]


def _trm_summary(manifest: Manifest) -> list[str]:
    verdict = "beats" if manifest.metrics["beats_best_baseline"] else "does NOT beat"
    return [f"the TRM {verdict} the best baseline (by R²)"]


def _evaluate_when(manifest: Manifest) -> str:
    return "after-grpo" if "grpo" in manifest.upstream else "before-grpo"


def _evaluate_tables(manifest: Manifest) -> list[Table]:
    when, metrics = _evaluate_when(manifest), manifest.metrics
    tables = [
        Table(
            f"evaluate-accuracy-{when}",
            metrics["rows"],
            f"Held-out end-task accuracy ({when}) on {metrics['n']} test problems (95% CIs)",
            evaluate.COLUMNS,
        )
    ]
    if metrics.get("before_after"):
        tables.append(
            Table(
                "evaluate-before-after-grpo",
                metrics["before_after"],
                "End-task accuracy before vs after GRPO on the same problems (paired bootstrap CIs)",
                evaluate.CHANGE_COLUMNS,
            )
        )
    return tables


def _grpo_summary(manifest: Manifest) -> list[str]:
    m = manifest.metrics
    return [
        f"{len(m['history'])} steps; reward rate {fmt(m['reward_rate'])} (first quarter "
        f"{fmt(m['reward_first_quarter'])}, last quarter {fmt(m['reward_last_quarter'])}); "
        f"{fmt(m['skipped_fraction'])} of groups skipped (no reward variance); resumed from {m['resumed_from']}"
    ]


def _grpo_tables(manifest: Manifest) -> list[Table]:
    metrics = manifest.metrics
    return [
        Table(
            "grpo-heldout-before-after",
            metrics["heldout"],
            f"GRPO: greedy accuracy before/after on {metrics['heldout_problems']} held-out "
            f"{metrics['problem_source']} problems",
            grpo.CHECK_COLUMNS,
        ),
        Table(
            "grpo-steps",
            metrics["history"],
            "GRPO per-step metrics (reward, accuracy, KL, clip fraction, entropy, length, skipped groups)",
            printed=False,
        ),
    ]


def _sweep_tables(manifest: Manifest) -> list[Table]:
    return [Table("sweep-table", manifest.metrics["rows"], "Compressor sweep (held-out test)", SWEEP_COLUMNS)]


# ---------------------------------------------------------------------------------------------
# The stages

MODEL_LAYER = ("model", "compressor.layer")
LATENT_INPUTS = ("model", "runtime.seed", "compressor.layer", "pairs.pre_positions", "trm.n_supervision")

declare(
    Stage(
        "problems",
        version="3",
        reads=("problems",),
        view=problems_view,
        run=run_problems,
        report=Report("Problem set"),
    )
)
declare(Stage("lm-head", version="1", reads=MODEL_LAYER))  # written by `hiddens` beside the corpus states
declare(
    Stage(
        "hiddens",
        version="4",  # 4: states stored as uncompressed fixed_size_binary vectors (llm_trm_core.arrow)
        reads=("model", "corpus", "compressor.layer", "compressor.cache_dtype", "compressor.rows_per_shard"),
        view=hiddens_view,
        run=run_corpus_hiddens,
        report=Report("Corpus hidden states"),
    )
)
declare(
    Stage(
        "basis",
        version="1",
        reads=("compressor.centered",),
        upstream=("hiddens",),
        run=run_basis,
        report=Report("Closed-form basis"),
    )
)
declare(
    Stage(
        "compressor",
        version="1",
        reads=("compressor", "runtime.seed"),
        view=compressor_view,
        upstream=("hiddens", "basis"),
        run=_compressor,
        report=Report(
            lambda cfg, m: (
                f"Compressor {m.config.get('phase', '1a')} D'={cfg.compressor.d_prime} ({cfg.compressor.solver})"
            )
        ),
    )
)
declare(
    Stage(
        "sweep",
        version="1",
        reads=("sweep.d_primes",),
        run=run_sweep_report,
        tasks=("sweep-report",),
        report=Report(
            "Compressor sweep",
            plot="plot.png",
            plot_alt="sweep",
            files=("table.json",),
            tables=_sweep_tables,
            metrics=False,
        ),
    )
)
declare(
    Stage(
        "datagen-shard",
        version="5",  # 5: sampled by lm/sampling.NucleusDraw; 4: states as fixed_size_binary / binary vectors
        reads=("model", "datagen", "runtime.seed", "compressor.layer", "compressor.cache_dtype"),
        view=datagen_shard_view,
        upstream=("problems",),
        run=_datagen_shard,
        task_run_name="datagen-shard-{index}",
    )
)
declare(
    Stage(
        "datagen",
        version="3",  # 3: the report names the token that follows the thinking span
        reads=("datagen",),
        upstream=("problems", "datagen-shard"),
        run=run_datagen_report,
        tasks=("datagen-report",),
        report=Report("Thinking generation", plot="think_length.png", plot_alt="thinking length"),
    )
)
declare(
    Stage(
        "trace-hiddens",
        version="4",  # 4: states stored as uncompressed fixed_size_binary vectors
        reads=(*MODEL_LAYER, "compressor.cache_dtype", "compressor.rows_per_shard"),
        upstream=("datagen",),
        run=run_trace_hiddens,
        report=Report("Thinking-trace hidden states"),
    )
)
declare(
    Stage(
        "pairs",
        version="3",  # 3: pairs stored as uncompressed fixed_size_binary / binary vectors
        reads=("pairs",),
        upstream=("datagen", "compressor"),
        run=run_pairs,
        report=Report(lambda cfg, m: f"Compressed pairs (D'={m.metrics['d_prime']})"),
    )
)
declare(
    Stage(
        "trm",
        version="6",  # 6: the last validation row counts the epoch the step budget ends with (5: top token named)
        reads=("trm", "runtime.seed", "runtime.device", "evaluate.bootstrap"),
        upstream=("pairs", "compressor"),
        run=trm.run_trm,
        report=Report(
            "TRM",
            plot="per_step.png",
            plot_alt="per step",
            files=("model.safetensors",),
            summary=_trm_summary,
            tables=_trm_tables,
            metrics=False,
        ),
    )
)
declare(
    Stage(
        "latent",
        version="5",  # 5: the mean output's TRM inputs kept; 4: shared system block run once; 3: mean output kept
        reads=("latent", *LATENT_INPUTS),
        upstream=("problems", "compressor", "trm"),
        run=run_latent,
        report=Report(lambda cfg, m: f"Latent injection (k={cfg.latent.num_latents})"),
    )
)
declare(
    Stage(
        "evaluate",
        version="4",  # 4: after GRPO, the mean output refitted on kept TRM inputs; 3: arms decoded by lm/decode.py
        reads=("evaluate", *LATENT_INPUTS, "latent.num_latents", "datagen.max_new_tokens"),
        upstream=("problems", "compressor", "trm", "latent"),
        run=evaluate.run_evaluate,
        tasks=("evaluate", "evaluate-before-grpo", "evaluate-after-grpo"),
        report=Report(
            lambda cfg, m: f"End-task evaluation ({_evaluate_when(m)})",
            plot="accuracy.png",
            plot_alt="accuracy",
            files=("answers.json",),
            tables=_evaluate_tables,
            metrics=False,
        ),
    )
)
declare(
    Stage(
        "grpo",
        version="4",  # 4: samples drawn by inverse CDF (lm/decode.py); 3: entropy taken while sampling
        reads=("grpo", *LATENT_INPUTS),
        upstream=("problems", "compressor", "trm", "latent"),
        run=grpo.run_grpo,
        report=Report(
            "GRPO",
            plot="rewards.png",
            plot_alt="reward curves",
            files=("history.json",),
            summary=_grpo_summary,
            tables=_grpo_tables,
            metrics=False,
        ),
    )
)
