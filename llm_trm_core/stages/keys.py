"""Which config parts and code version make up each stage's artifact key (docs/architecture.md, "Keys").

Bump a stage's code version in the same commit as any change that alters its outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from llm_trm_core.config import PipelineConfig, keyed_dump
from llm_trm_core.data.files import fingerprint, list_files
from llm_trm_core.store import stage_key

STAGE_CODE_VERSIONS: dict[str, str] = {
    "lm-head": "1",
    "problems": "3",
    "hiddens": "3",
    "basis": "1",
    "compressor": "1",
    "sweep": "1",
    "datagen-shard": "3",
    "datagen": "2",
    "trace-hiddens": "3",
    "pairs": "2",
    "trm": "3",
    "latent": "2",
    "evaluate": "2",
    "grpo": "2",
}

# Sections ("compressor") or single fields ("compressor.layer") each stage reads.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "problems": ("problems",),
    "lm-head": ("model", "compressor.layer"),
    "hiddens": ("model", "corpus", "compressor.layer", "compressor.cache_dtype", "compressor.rows_per_shard"),
    "basis": ("compressor.centered",),
    "compressor": ("compressor", "runtime.seed"),
    "sweep": ("sweep.d_primes",),
    "datagen-shard": ("model", "datagen", "runtime.seed", "compressor.layer", "compressor.cache_dtype"),
    "datagen": ("datagen",),
    "trace-hiddens": ("model", "compressor.layer", "compressor.cache_dtype", "compressor.rows_per_shard"),
    "pairs": ("pairs",),
    "trm": ("trm", "runtime.seed", "runtime.device", "evaluate.bootstrap"),
    "latent": ("latent", "model", "runtime.seed", "compressor.layer", "pairs.pre_positions", "trm.n_supervision"),
    "grpo": ("grpo", "model", "runtime.seed", "compressor.layer", "pairs.pre_positions", "trm.n_supervision"),
    "evaluate": (
        "evaluate",
        "model",
        "runtime.seed",
        "compressor.layer",
        "pairs.pre_positions",
        "trm.n_supervision",
        "latent.num_latents",
        "datagen.max_new_tokens",
    ),
}

_SGD_ONLY = frozenset(
    {
        "batch_tokens", "grad_accum", "lr", "weight_decay", "epochs", "max_steps", "schedule", "warmup_steps",
        "decay_fraction", "min_lr_ratio", "grad_clip", "mixed_precision", "eval_every", "patience", "min_delta",
    }
)  # fmt: skip


def _compressor_view(dumped: dict[str, Any]) -> dict[str, Any]:
    """A closed-form 1a compressor does not depend on the SGD hyper-parameters or the seed (1b always trains)."""
    section = dumped.get("compressor", {})
    if section.get("solver") == "closed_form" and dumped.get("phase", "1a") == "1a":
        dumped["compressor"] = {k: v for k, v in section.items() if k not in _SGD_ONLY}
        dumped.pop("runtime.seed", None)
    return dumped


def _datagen_shard_view(dumped: dict[str, Any]) -> dict[str, Any]:
    """A shard is identified by its index range, so how many problems or shards there are does not matter."""
    dumped["datagen"] = {k: v for k, v in dumped["datagen"].items() if k not in ("num_problems", "shard_size")}
    return dumped


def _file_source(section: dict[str, Any], field: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """`path` matters only for source=file, and then so does what the files hold (their fingerprint)."""
    if section.get("source") != "file":
        return {k: v for k, v in section.items() if k != "path"}
    return {**section, "files": fingerprint(list_files(str(section["path"]), field, kinds))}


def _problems_view(dumped: dict[str, Any]) -> dict[str, Any]:
    """Difficulty fields of the arithmetic source do not affect the other sources' problems."""
    section = dumped["problems"]
    if section.get("source") != "arithmetic":
        section = {k: v for k, v in section.items() if not k.startswith("arithmetic_")}
    dumped["problems"] = _file_source(section, "problems.path", ("parquet", "jsonl"))
    return dumped


def _hiddens_view(dumped: dict[str, Any]) -> dict[str, Any]:
    corpus = dumped["corpus"]
    if corpus.get("max_doc_tokens") is None:  # no cap: the same states as before the field existed
        corpus = {k: v for k, v in corpus.items() if k != "max_doc_tokens"}
    dumped["corpus"] = _file_source(corpus, "corpus.path", ("parquet", "jsonl", "text"))
    return dumped


STAGE_VIEWS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "problems": _problems_view,
    "hiddens": _hiddens_view,
    "compressor": _compressor_view,
    "datagen-shard": _datagen_shard_view,
}


def _lookup(cfg: PipelineConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return keyed_dump(value) if isinstance(value, BaseModel) else value


def stage_config(cfg: PipelineConfig, stage: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config of a stage: what it reads, without fields that do not affect outputs."""
    dumped = {part: _lookup(cfg, part) for part in STAGE_SECTIONS[stage]}
    dumped.update(extra or {})
    view = STAGE_VIEWS.get(stage)
    return view(dumped) if view else dumped


def key_for(
    cfg: PipelineConfig,
    stage: str,
    upstream: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    return stage_key(stage, STAGE_CODE_VERSIONS[stage], stage_config(cfg, stage, extra), upstream or {})
