"""The flagship rehearsal: the `smollm3-3b` preset end to end on local stand-ins, on a CPU.

    assets = prepare_assets(Path("rehearsal"))            # stand-in model folder, problem and corpus files
    cfg = rehearsal_config(assets, store="file://...")    # smollm3-3b + REHEARSAL_OVERRIDES
    ... run the pipeline flow while `RssSampler` records the process's memory (flows/rehearse.py)

Everything that differs from the preset is in `REHEARSAL_OVERRIDES` (and the three asset paths filled in
by `rehearsal_config`); every other field is the preset's, verbatim. The stand-ins keep the flagship's
shapes where they decide memory and compute per layer:

- model: a random-init `SmolLM3ForCausalLM` at SmolLM3-3B's width (hidden 2048, MLP 11008), heads (16
  attention / 4 key-value), vocabulary (128256 rows, tied embeddings) and context, with fewer layers
  (`STANDIN_LAYERS`), saved with save_pretrained and loaded with model.source=folder. Its tokenizer is a
  small byte-level BPE trained offline (llm_trm_core/lm/tiny.py) with the project's ChatML template and
  `<think>`/`</think>` as single special tokens. Embedding rows the tokenizer does not know are zero (so
  their logit is exactly 0) and the known rows are scaled up, so the random model writes text the
  tokenizer can decode instead of ids it would silently drop;
- problems: a GSM8K-shaped Parquet file (question, answer ending in `#### N`, split train/test, train
  rows first), generated offline by reasoning-gym `gsm_symbolic`;
- corpus: a local text file of Python's bundled documentation topics.

Imports nothing heavy at module level (no torch, transformers or prefect).
"""

from __future__ import annotations

import json
import resource
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_trm_core.config import PipelineConfig, apply_overrides, parse_config, preset_data
from llm_trm_core.errors import ConfigError

PRESET = "smollm3-3b"

# SmolLM3-3B's shapes (HuggingFaceTB/SmolLM3-3B config.json); the stand-in keeps all but the depth.
SMOLLM3_3B = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_layers": 36,
    "num_heads": 16,
    "num_kv_heads": 4,
    "vocab_size": 128256,
    "max_position_embeddings": 65536,
}
STANDIN_LAYERS = 2
STANDIN_TOKENIZER_VOCAB = 1024  # the BPE's trained size (bytes, merges, specials); the model keeps 128256 rows
STANDIN_EMBED_STD = 0.5  # known rows: logits of std ~20 after the final norm, so unknown ids (logit 0) never win

TRAIN_PROBLEMS, TEST_PROBLEMS = 48, 16
CORPUS_TOPICS = 12

# What the rehearsal changes in the smollm3-3b preset, and why. Everything else is the preset's value.
# `model.name_or_path`, `problems.path` and `corpus.path` are filled in with the generated stand-ins.
REHEARSAL_OVERRIDES: dict[str, Any] = {
    # (a) local stand-ins for the hub assets
    "model": {
        "source": "folder",
        # (c) float32: bf16 matmuls are unusably slow on this CPU (the GPU run keeps bfloat16)
        "dtype": "float32",
        # a random model never opens <think> by itself: the prompt opens it (preflight's native check
        # accepts the stand-in's tokenizer and model type smollm3: tests/test_flagship.py)
        "thinking": "prompted",
    },
    "problems": {"source": "file"},
    "corpus": {"source": "file", "num_documents": 24, "max_tokens": 64, "max_doc_tokens": 96},
    # (c) this machine
    "runtime": {"device": "cpu"},
    # (b) counts shrunk
    "compressor": {"eval_lm_head_tokens": 256, "extract_batch_size": 8},
    "datagen": {
        "num_problems": 24,
        "shard_size": 8,
        "batch_size": 4,
        "max_new_tokens": 16,
        "max_answer_tokens": 8,
        # a random model never writes </think>: close the span at the budget (recorded as end_source)
        "close_on_budget": True,
    },
    "trm": {"epochs": 1, "max_steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
    "latent": {"num_problems": 8, "epochs": 1, "batch_size": 4, "warmup_steps": 1},
    "grpo": {
        "steps": 2,
        "questions_per_step": 2,
        "group_size": 2,
        "max_completion_tokens": 8,
        "warmup_steps": 0,
        "eval_problems": 2,
        "micro_batch": 4,
        "checkpoint_every": 1,
    },
    "evaluate": {"num_problems": 4, "max_answer_tokens": 8, "think_tokens": 16, "bootstrap": 200, "batch_size": 4},
}


@dataclass(frozen=True)
class RehearsalAssets:
    model: Path
    problems: Path
    corpus: Path


def prepare_assets(root: Path, layers: int = STANDIN_LAYERS) -> RehearsalAssets:
    """Write the stand-ins under `root` (each reused when already complete)."""
    if layers < 1:
        raise ConfigError(f"--layers {layers}: the stand-in SmolLM3 needs at least 1 decoder layer")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--workdir {root}: cannot create the stand-ins' folder ({exc.strerror or exc}); choose a writable folder"
        ) from None
    assets = RehearsalAssets(root / f"smollm3-standin-{layers}l", root / "gsm8k-shaped.parquet", root / "corpus.txt")
    if not (assets.model / "READY").exists():
        build_standin_model(assets.model, layers)
    if not assets.problems.exists():
        write_problem_file(assets.problems)
    if not assets.corpus.exists():
        write_corpus_file(assets.corpus)
    return assets


def rehearsal_overrides(assets: RehearsalAssets) -> dict[str, Any]:
    """`REHEARSAL_OVERRIDES` with the stand-ins' paths filled in."""
    out = json.loads(json.dumps(REHEARSAL_OVERRIDES))
    out["model"]["name_or_path"] = str(assets.model)
    out["problems"]["path"] = str(assets.problems)
    out["corpus"]["path"] = str(assets.corpus)
    return out


def rehearsal_config(assets: RehearsalAssets, store: str, extra: list[str] | None = None) -> PipelineConfig:
    """The smollm3-3b preset + the rehearsal's overrides + `store.root` (+ dotted `extra` overrides)."""
    data = _merge(preset_data(PRESET), rehearsal_overrides(assets))
    data["store"] = {"root": store}
    return parse_config(apply_overrides(data, extra or []))


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
        )
    return out


def build_standin_model(folder: Path, layers: int = STANDIN_LAYERS) -> None:
    """A random SmolLM3 at SmolLM3-3B's width, heads and vocabulary, `layers` deep, saved float32."""
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from llm_trm_core.lm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(STANDIN_TOKENIZER_VOCAB)
    shape = SMOLLM3_3B
    config = SmolLM3Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmolLM3ForCausalLM(config)
        with torch.no_grad():
            embed: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
            known = len(tokenizer)
            embed[known:].zero_()
            embed[:known].normal_(0.0, STANDIN_EMBED_STD)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "READY").write_text("ok\n")


def write_problem_file(path: Path, train: int = TRAIN_PROBLEMS, test: int = TEST_PROBLEMS) -> None:
    """GSM8K's shape: question, answer (worked solution ending in `#### N`), split; train rows first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_trm_core.data.problems import _gsm_symbolic_rows

    rows = list(_gsm_symbolic_rows(train + test, seed=18))
    splits = ["train"] * train + ["test"] * test
    table = pa.table(
        {"question": [r[0] for r in rows], "answer": [r[1] for r in rows], "split": splits},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_corpus_file(path: Path, topics: int = CORPUS_TOPICS) -> None:
    from llm_trm_core.data.corpus import python_doc_topics

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(python_doc_topics(limit=topics)) + "\n", encoding="utf-8")


# -- memory ---------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss()


def peak_rss() -> int:
    """The process's peak RSS so far (ru_maxrss, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class RssSampler:
    """A daemon thread sampling this process's RSS every `interval` seconds: `peak_between(t0, t1)` is the
    largest sample in a window (Prefect tasks run in the flow's process, so a task's window is its stage)."""

    interval: float = 0.02
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append((time.time(), current_rss()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), current_rss()))
            self._stop.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        before = [rss for t, rss in self.samples if t < start]
        # the sample just before the window also bounds the window's start
        return max(inside + before[-1:], default=0)


# -- rows per split ------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")


def rows_per_split(stage: str, metrics: Mapping[str, Any]) -> dict[str, int | None]:
    """Rows of each split a stage's manifest reports (None: the stage does not report that split)."""
    found: dict[str, int | None] = dict.fromkeys(SPLITS)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    flat = {  # flat keys such as pairs_train, tokens_val, n_test, or train_problems, val_problems
        split: value
        for split in SPLITS
        for key, value in numbers.items()
        if key.endswith(f"_{split}") or key == f"{split}_problems"
    }
    if "heldout_problems" in numbers:  # grpo: its held-out problems are test problems
        flat.setdefault("test", numbers["heldout_problems"])
    arms = metrics.get("arms")  # evaluate: every arm answers the same test problems
    if isinstance(arms, Mapping) and arms:
        flat.setdefault("test", max(int(arm.get("n", 0)) for arm in arms.values() if isinstance(arm, Mapping)))
    for candidate in [flat, *_split_maps(metrics)]:
        for split in SPLITS:
            if found[split] is None and isinstance(candidate.get(split), int | float):
                found[split] = int(candidate[split])
    return found


def _split_maps(node: Any, depth: int = 0) -> list[Mapping[str, Any]]:
    """Mappings with numeric train/val/test entries, shallowest first (breadth by depth)."""
    if depth > 4 or not isinstance(node, Mapping):
        return []
    out: list[Mapping[str, Any]] = []
    if any(isinstance(node.get(s), int | float) and not isinstance(node.get(s), bool) for s in SPLITS):
        out.append(node)
    preferred = ("rows", "pairs", "problems", "documents", "split_counts", "splits", "per_split", "counts")
    keys = sorted(node, key=lambda k: (k not in preferred, str(k)))
    for key in keys:
        out.extend(_split_maps(node[key], depth + 1))
    return out
