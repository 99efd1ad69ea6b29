"""The run's plan: how many problems of each split every stage takes, checked before any model loads.

Selection rules (the stages apply the same functions to the problem set they read):
- datagen: the first `datagen.num_problems` of the splits interleaved in proportion to their sizes
  (`ProblemSet.select_stratified`): GSM8K's 6726 train / 747 val / 1319 test with 1000 gives
  765 / 85 / 150, and a larger count extends a smaller one. Its pairs feed compressor 1b
  (trace-hiddens), pairs and the TRM, which need train, val and test pairs;
- latent: the first `latent.num_problems` train problems and the first
  max(latent.batch_size, latent.num_problems // 4) val problems;
- evaluate: the first `evaluate.num_problems` test problems;
- grpo: samples from the whole train split of its problem set (`grpo.problems`, default the
  pipeline's) and checks the first `grpo.eval_problems` test problems before and after.
A count above a split's size takes the whole split. `check_plan` refuses a plan that leaves a split
some stage needs empty, naming the field to change; the problem sets' split sizes come from reading
the problems (generated sources and files; well under a second for GSM8K-sized sets) or, for GSM8K on
the hub, from its official sizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from llm_trm_core.config import LatentConfig, ModelConfig, PipelineConfig, ProblemsConfig
from llm_trm_core.data.corpus import corpus_files
from llm_trm_core.data.problems import SPLITS, split_sizes
from llm_trm_core.data.splits import allocate, interleave
from llm_trm_core.errors import ConfigError

logger = logging.getLogger(__name__)

_THROUGH_PAIRS = ("hiddens", "basis", "compressor", "problems", "datagen", "trace-hiddens", "pairs")
# The stages each graph command runs (with their upstream stages; a command's own stage last), for
# `check_plan(cfg, COMMAND_STAGES[name])`. Derived by `llm_trm_core.stages.graph.stages_of`, which runs a
# command's graph with a call that only records (datagen's shards are part of datagen here); kept written
# out because preflight needs it before any stage module (torch) is imported, and
# tests/test_declarations.py fails when the two disagree.
COMMAND_STAGES: dict[str, tuple[str, ...]] = {
    "compressor": ("hiddens", "basis", "compressor"),
    "compressor-1b": _THROUGH_PAIRS[:-1],
    "sweep": ("hiddens", "basis", "compressor", "sweep"),
    "datagen": ("problems", "datagen"),
    "pairs": _THROUGH_PAIRS,
    "trm": (*_THROUGH_PAIRS, "trm"),
    "latent": (*_THROUGH_PAIRS, "trm", "latent"),
    "evaluate": (*_THROUGH_PAIRS, "trm", "latent", "evaluate"),
    "grpo": (*_THROUGH_PAIRS, "trm", "latent", "evaluate", "grpo"),
    "pipeline": (*_THROUGH_PAIRS, "trm", "latent", "evaluate", "grpo"),
}
PAIR_CONSUMERS = ("trace-hiddens", "pairs", "trm")  # need datagen pairs of every split


def command_stages(command: str) -> tuple[str, ...]:
    """The stages `command` runs: `COMMAND_STAGES`, or a declared stage after its declared upstream stages."""
    if command in COMMAND_STAGES:
        return COMMAND_STAGES[command]
    from llm_trm_core.stages.declaration import stage

    out: list[str] = []
    for upstream in stage(command).upstream:
        out += [s for s in command_stages(upstream) if s not in out]
    return (*out, command)


def latent_val_count(lat: LatentConfig) -> int:
    """Val-split problems the latent stage validates on."""
    return max(lat.batch_size, lat.num_problems // 4)


def _taken(sizes: Mapping[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    return {split: min(n, sizes.get(split, 0)) for split, n in counts.items()}


def plan_counts(cfg: PipelineConfig, stages: Collection[str] | None = None) -> dict[str, Any]:
    """Problems per split of each problem set and what each stage in `stages` (default: the pipeline) takes.

    `None` for a problem set whose sizes are unknown without downloading it (a hub dataset other than GSM8K).
    """
    wanted = set(COMMAND_STAGES["pipeline"] if stages is None else stages)
    out: dict[str, Any] = {}
    if wanted & {"problems", "datagen", "latent", "evaluate", *PAIR_CONSUMERS}:
        sizes = split_sizes(cfg.problems)
        out["problems"] = sizes
        if sizes is not None:
            if wanted & {"datagen", *PAIR_CONSUMERS}:
                out["datagen"] = allocate(sizes, cfg.datagen.num_problems)
            if "latent" in wanted:
                out["latent"] = _taken(sizes, {"train": cfg.latent.num_problems, "val": latent_val_count(cfg.latent)})
            if "evaluate" in wanted:
                out["evaluate"] = _taken(sizes, {"test": cfg.evaluate.num_problems})
    if "grpo" in wanted:
        if cfg.grpo.problems is not None:
            sizes = split_sizes(cfg.grpo.problems)
        else:
            sizes = out["problems"] if "problems" in out else split_sizes(cfg.problems)
        out["grpo_problems"] = sizes
        if sizes is not None:
            out["grpo"] = _taken(sizes, {"train": sizes["train"], "test": cfg.grpo.eval_problems})
    return out


def _describe(sizes: Mapping[str, int]) -> str:
    return " / ".join(f"{sizes.get(split, 0)} {split}" for split in SPLITS)


def _split_fix(pcfg: ProblemsConfig, prefix: str, split: str) -> str:
    """How to give a problem set some `split` problems."""
    fraction = {"val": "val_fraction", "test": "test_fraction"}.get(split)
    if fraction and getattr(pcfg, fraction) == 0.0 and not (pcfg.source == "gsm8k" and split == "test"):
        extra = f", or add split={split} rows to {pcfg.path}" if pcfg.source == "file" else ""
        return f"set {prefix}.{fraction} above 0 (e.g. 0.1){extra}"
    if pcfg.source == "file":
        return f"add problems to {pcfg.path}" + (f" or raise {prefix}.{fraction}" if fraction else "")
    if pcfg.source in ("gsm_symbolic", "arithmetic"):
        return f"raise {prefix}.num_generated (now {pcfg.num_generated})" + (
            f" or {prefix}.{fraction}" if fraction else ""
        )
    return f"check {prefix}.hub_id / {prefix}.hub_config"


def _require(pcfg: ProblemsConfig, prefix: str, sizes: Mapping[str, int], splits: tuple[str, ...], stage: str) -> None:
    for split in splits:
        if sizes.get(split, 0) == 0:
            raise ConfigError(
                f"plan: {split} problems are needed by {stage}, but the problem set ({prefix}.source={pcfg.source}: "
                f"{_describe(sizes)}) has none; {_split_fix(pcfg, prefix, split)}"
            )


def _minimal_datagen_count(sizes: Mapping[str, int]) -> int:
    first: dict[str, int] = {}
    for position, (split, _) in enumerate(interleave(sizes)):
        first.setdefault(split, position)
        if len(first) == sum(1 for n in sizes.values() if n):
            break
    return max(first.values()) + 1


def check_plan(cfg: PipelineConfig, stages: Collection[str] | None = None) -> None:
    """Refuse (ConfigError naming the field to change) a plan that leaves a split a stage needs empty.

    `stages`: the stages the run executes, upstream ones included (`COMMAND_STAGES[command]`); default
    the whole pipeline. Also refuses problem or corpus files that cannot be used. Loads no model.
    """
    wanted = set(COMMAND_STAGES["pipeline"] if stages is None else stages)
    if "hiddens" in wanted and cfg.corpus.source == "file":
        corpus_files(cfg.corpus)
    counts = plan_counts(cfg, wanted)
    if "problems" in counts:
        sizes = counts["problems"]
        if sizes is None:  # a hub dataset of unknown size: only what the fractions decide
            logger.info("plan: split sizes of %s are unknown before download", cfg.problems.hub_id)
            sizes = {"train": 1, "val": int(cfg.problems.val_fraction > 0), "test": 1}
        if not any(sizes.values()):
            raise ConfigError(f"plan: the problem set (problems.source={cfg.problems.source}) has no problems")
        if wanted & set(PAIR_CONSUMERS):
            _require(cfg.problems, "problems", sizes, SPLITS, "trace-hiddens, pairs and trm (through datagen)")
            empty = [split for split, n in counts.get("datagen", {}).items() if n == 0]
            if empty:
                raise ConfigError(
                    f"plan: datagen.num_problems={cfg.datagen.num_problems} takes no {'/'.join(empty)} problems "
                    f"(it draws from the problem set's {_describe(sizes)} in proportion); trace-hiddens, pairs and trm "
                    f"need pairs of every split: set datagen.num_problems >= {_minimal_datagen_count(sizes)}"
                )
        if "latent" in wanted:
            _require(cfg.problems, "problems", sizes, ("train", "val"), "latent")
        if "evaluate" in wanted:
            _require(cfg.problems, "problems", sizes, ("test",), "evaluate")
    if "grpo" in wanted:
        own = cfg.grpo.problems is not None
        pcfg, prefix = (cfg.grpo.problems, "grpo.problems") if cfg.grpo.problems else (cfg.problems, "problems")
        grpo_sizes = counts["grpo_problems"] or {"train": 1, "val": 0, "test": 1}
        _require(pcfg, prefix, grpo_sizes, ("train", "test"), "grpo" + (" (on grpo.problems)" if own else ""))


# Hidden sizes of hub models the presets name, for a check before anything is downloaded.
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what model.source=smollm2-gguf converts
KNOWN_HIDDEN_SIZES = {"HuggingFaceTB/SmolLM3-3B": 2048, SMOLLM2: 576}


def model_hidden_size(model: ModelConfig) -> int | None:
    """The model's hidden size D when it is known without loading it (None: unknown until it loads)."""
    if model.source == "tiny-random":
        return model.tiny.hidden_size
    if model.source == "smollm2-gguf":
        return KNOWN_HIDDEN_SIZES[SMOLLM2]
    config_path: str | None = str(Path(model.name_or_path) / "config.json") if model.source == "folder" else None
    if model.source == "hub":
        from huggingface_hub import try_to_load_from_cache

        with contextlib.suppress(ValueError):
            found = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
            config_path = found if isinstance(found, str) else None
    if config_path is not None:
        with contextlib.suppress(OSError, ValueError):
            size = json.loads(Path(config_path).read_text()).get("hidden_size")
            if isinstance(size, int):
                return size
    return KNOWN_HIDDEN_SIZES.get(model.name_or_path) if model.source == "hub" else None


def check_shapes(cfg: PipelineConfig, stages: Collection[str] | None = None) -> None:
    """Refuse sizes that cannot work together (ConfigError naming the field): D' not below the model's
    hidden size D, a sweep with no D' below D, TRM heads that do not divide D'."""
    wanted = set(COMMAND_STAGES["pipeline"] if stages is None else stages)
    hidden = model_hidden_size(cfg.model)
    d_prime = cfg.compressor.d_prime
    where = f"model.source={cfg.model.source}" + (f" {cfg.model.name_or_path}" if cfg.model.name_or_path else "")
    if hidden is not None and "compressor" in wanted and "sweep" not in wanted and d_prime >= hidden:
        raise ConfigError(
            f"compressor.d_prime={d_prime} is not below the model's hidden size D={hidden} ({where}): there is "
            f"nothing to compress. Fix: set compressor.d_prime below {hidden} (e.g. compressor.d_prime={hidden // 4})"
        )
    if hidden is not None and "sweep" in wanted and not [d for d in cfg.sweep.d_primes if d < hidden]:
        raise ConfigError(
            f"sweep.d_primes={cfg.sweep.d_primes} has no value below the model's hidden size D={hidden} ({where}). "
            f"Fix: list D' values below {hidden} (e.g. sweep.d_primes=[{hidden // 8}, {hidden // 4}])"
        )
    if "trm" in wanted and d_prime % cfg.trm.n_heads:
        raise ConfigError(
            f"trm.n_heads={cfg.trm.n_heads} does not divide compressor.d_prime={d_prime} (the TRM works at width D'). "
            f"Fix: choose trm.n_heads among {[h for h in range(1, min(d_prime, 32) + 1) if d_prime % h == 0]}"
        )
