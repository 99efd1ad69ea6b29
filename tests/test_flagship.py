"""The flagship (smollm3-3b) settings and checks: device discipline, thinking format, whole datagen batches,
the shared LM, the per-document token cap, chunked GRPO log-probs, the rehearsal config, the cost model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_trm_core.config import RuntimeConfig, load_config
from llm_trm_core.errors import ConfigError
from llm_trm_core.grpo.rollout import token_log_probs
from llm_trm_core.preflight import DeviceUnavailableError, ThinkingFormatError, check_runtime, thinking_problem

ROOT = Path(__file__).resolve().parents[1]


# -- device discipline ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line_error() -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        check_runtime(RuntimeConfig(device="cuda"))
    message = str(info.value)
    assert "\n" not in message and "runtime.device=cuda" in message and "Fix:" in message
    check_runtime(RuntimeConfig(device="cpu"))  # nothing asked, nothing checked
    check_runtime(RuntimeConfig(device="auto"))


def test_old_driver_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    def unavailable() -> bool:
        warnings.warn("The NVIDIA driver on your system is too old (found version 11040).", stacklevel=1)
        return False

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    with pytest.raises(DeviceUnavailableError, match="driver is too old.*found version 11040.*supports CUDA 12.8"):
        check_runtime(RuntimeConfig(device="cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_refuses_cuda_without_a_device(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "datagen", "--preset", "tiny", "--store", f"file://{tmp_path}",
         "runtime.device=cuda"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: runtime.device=cuda"), result.stderr


def test_gpu_deployments_request_cuda() -> None:
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    gpu = [d for d in spec["deployments"] if d["parameters"]["cfg"].get("preset") == "smollm3-3b"]
    assert gpu and all(d["parameters"]["cfg"]["runtime"]["device"] == "cuda" for d in gpu)


# -- thinking format -----------------------------------------------------------------------------


def _tiny_tokenizer() -> object:
    from llm_trm_core.lm.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(384)


def test_native_thinking_needs_a_known_family_or_a_template_that_opens_think() -> None:
    cfg = load_config("tiny", ["model.thinking=native", "model.source=folder", "model.name_or_path=/m/plain-lm"])
    with pytest.raises(ThinkingFormatError, match="does not open <think>.*set model.thinking=prompted"):
        thinking_problem(_tiny_tokenizer(), cfg.model, "llama")
    thinking_problem(_tiny_tokenizer(), cfg.model, "smollm3")  # SmolLM3 opens it itself


def test_native_thinking_needs_a_single_end_token() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["plain text only"], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="t")
    cfg = load_config("tiny", ["model.thinking=native", "model.source=folder", "model.name_or_path=/m/x"])
    with pytest.raises(ThinkingFormatError, match="</think> is .* tokens .* not one"):
        thinking_problem(tokenizer, cfg.model, "smollm3")


# -- throughput and memory settings ----------------------------------------------------------------


def test_shard_size_must_be_a_multiple_of_batch_size() -> None:
    with pytest.raises(ConfigError, match="shard_size=10 is not a multiple of datagen.batch_size=4"):
        load_config("tiny", ["datagen.shard_size=10", "datagen.batch_size=4"])
    flagship = load_config("smollm3-3b")
    assert flagship.datagen.shard_size % flagship.datagen.batch_size == 0
    assert flagship.compressor.cache_dtype == "float16" and flagship.corpus.max_doc_tokens is not None
    stored = flagship.corpus.num_documents * flagship.corpus.max_doc_tokens * 2048 * 2
    assert stored <= 50e9  # corpus states of the preset


def test_language_model_loaded_once_per_process() -> None:
    from llm_trm_core.lm import release_shared_language_model, shared_language_model

    cfg = load_config("tiny")
    release_shared_language_model()
    first = shared_language_model(cfg.model, cfg.runtime)
    assert shared_language_model(cfg.model, cfg.runtime) is first
    other = load_config("tiny", ["model.tiny.seed=1"])
    assert shared_language_model(other.model, other.runtime) is not first
    release_shared_language_model()


def test_per_document_token_cap() -> None:
    from llm_trm_core.data.corpus import Document
    from llm_trm_core.hidden_states import chunk_documents
    from llm_trm_core.stages.keys import key_for

    tokenizer = _tiny_tokenizer()
    docs = [Document("d0", "train", "word " * 300), Document("d1", "test", "other " * 40)]
    chunks, n = chunk_documents(docs, tokenizer, 16, max_doc_tokens=40)
    per_doc = {d: sum(len(c.input_ids) for c in chunks if c.doc_id == d) for d in ("d0", "d1")}
    assert n == 2 and per_doc["d0"] == 40 and per_doc["d1"] <= 40
    assert max(len(c.input_ids) for c in chunks) <= 16
    # unset, the hiddens key is what it was before the field existed; set, it changes
    base, capped = load_config("tiny"), load_config("tiny", ["corpus.max_doc_tokens=40"])
    assert key_for(base, "hiddens") != key_for(capped, "hiddens")


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunked_log_probs_equal_full_ones(chunk: int) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False)
    states = torch.randn(3, 11, 32, requires_grad=True)
    targets = torch.randint(0, 500, (3, 11))
    logp, entropy = token_log_probs(head, states, targets, 0.7, chunk=chunk)
    full = (head(states).float() / 0.7).log_softmax(-1)
    ref_logp = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    (grad,) = torch.autograd.grad((logp * 1.3 + entropy * 0.1).sum(), states)
    (ref_grad,) = torch.autograd.grad((ref_logp * 1.3 + ref_entropy * 0.1).sum(), states)
    torch.testing.assert_close(grad, ref_grad)
