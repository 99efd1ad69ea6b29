"""Language-model loading: tiny random SmolLM3, the embedded SmolLM2 GGUF, hub ids offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from llm_trm_core.config import ModelConfig, RuntimeConfig, load_config
from llm_trm_core.errors import ConfigError, UserError
from llm_trm_core.lm import gguf_cache, load_language_model
from llm_trm_core.lm.chat import make_chat_format
from llm_trm_core.lm.gguf_cache import COMPLETE_MARKER
from llm_trm_core.preflight import ModelSourceError, check_model


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    return load_language_model(cfg.model, cfg.runtime)


def test_tiny_smollm3_has_thinking_tokens_and_template(tiny) -> None:
    assert type(tiny.model).__name__ == "SmolLM3ForCausalLM"
    assert tiny.info.hidden_size == 64 and tiny.info.num_layers == 2
    delims = tiny.chat.delimiters
    assert delims.single_tokens
    assert tiny.tokenizer.convert_ids_to_tokens(list(delims.start_ids + delims.end_ids)) == ["<think>", "</think>"]

    think = tiny.chat.prompt("What is 2 + 3?", enable_thinking=True)
    no_think = tiny.chat.prompt("What is 2 + 3?", enable_thinking=False)
    assert think.endswith("<|im_start|>assistant\n<think>\n")
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert think.startswith(f"<|im_start|>system\n{tiny.chat.system_prompt}<|im_end|>")
    assert "Today" not in think and "Date" not in think  # fixed system prompt, no date
    ids = tiny.tokenizer(think).input_ids
    assert ids[-2] == delims.start_ids[0]  # "<think>" then "\n"


def test_native_thinking_leaves_the_span_to_the_model(tiny) -> None:
    chat = make_chat_format(tiny.tokenizer, system_prompt="S", thinking="native", template="project")
    assert chat.prompt("Q").endswith("<|im_start|>assistant\n")
    assert chat.prompt("Q", enable_thinking=False).endswith("<think>\n\n</think>\n")


def test_tiny_model_is_deterministic_and_generates(tiny) -> None:
    cfg = load_config("tiny")
    again = load_language_model(cfg.model, cfg.runtime)
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tiny.tokenizer.get_vocab() == again.tokenizer.get_vocab()
    other = load_language_model(load_config("tiny", ["model.tiny.seed=1"]).model)
    assert not torch.equal(other.model.lm_head.weight, tiny.model.lm_head.weight)

    batch = tiny.tokenizer(
        [tiny.chat.prompt("a"), tiny.chat.prompt("a longer question")], return_tensors="pt", padding=True
    )
    assert batch.attention_mask[0, 0] == 0  # left padding
    out = tiny.model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)
    hidden = tiny.model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and hidden[-1].shape[-1] == 64


def test_hub_model_offline_is_a_clear_error() -> None:
    start = time.perf_counter()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache.*"
                       "--preset local"):  # fmt: skip
        load_language_model(
            ModelConfig(source="hub", name_or_path="HuggingFaceTB/SmolLM3-3B"), RuntimeConfig(device="cpu")
        )
    assert time.perf_counter() - start < 5.0
    with pytest.raises(ConfigError, match=r"model folder /nonexistent/model \(model.source=folder\) does not exist"):
        load_language_model(ModelConfig(source="folder", name_or_path="/nonexistent/model"))


def test_folder_without_a_tokenizer_is_named_before_any_tokenizer_backend(tiny, tmp_path: Path) -> None:
    """Before: transformers' "You need to have sentencepiece or tiktoken installed ..." from AutoTokenizer."""
    tiny.model.save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError) as info:
        load_language_model(ModelConfig(source="folder", name_or_path=str(tmp_path)))
    message = str(info.value)
    assert message.startswith(f"model folder {tmp_path} (model.source=folder) has no tokenizer (tokenizer.json")
    assert "You need to have sentencepiece or tiktoken" not in message and "\n" not in message


def test_folder_source_loads_a_saved_model(tiny, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_language_model(ModelConfig(source="folder", name_or_path=str(tmp_path)))
    assert torch.equal(loaded.model.lm_head.weight, tiny.model.lm_head.weight)
    assert loaded.chat.delimiters == tiny.chat.delimiters


def test_smollm2_from_the_embedded_gguf() -> None:
    """First call converts the GGUF into the safetensors cache (~20-30 s); reloads take seconds."""
    cfg = load_config("local")
    lm = load_language_model(cfg.model, cfg.runtime)
    assert lm.info.hidden_size == 576 and lm.info.num_layers == 30 and lm.info.vocab_size == 49152
    assert lm.info.dtype == "float32"
    from llm_trm_core.lm.gguf_cache import default_cache_dir

    folder = default_cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()

    start = time.perf_counter()
    again = load_language_model(cfg.model, cfg.runtime)
    assert time.perf_counter() - start < 10.0
    assert torch.equal(again.model.model.embed_tokens.weight[:4], lm.model.model.embed_tokens.weight[:4])

    # SmolLM2 has no thinking mode: <think> is several ordinary tokens and the prompt opens the span.
    assert not lm.chat.delimiters.single_tokens
    prompt = lm.chat.prompt("What is 2 + 3?")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    with pytest.raises(ConfigError, match="set model.thinking=prompted"):
        make_chat_format(lm.tokenizer, system_prompt="S", thinking="native", template="project")


def test_incomplete_smollm2_cache_is_detected_and_rebuilt(tiny, tmp_path: Path, monkeypatch) -> None:
    """A converted cache that lost or truncated a file is converted again, not loaded half.

    The conversion itself (GGUF -> safetensors, 20-30 s, 517 MiB) is replaced by saving the tiny model:
    what is tested is the detection and the rebuild, on the real cache folder and marker.
    """
    conversions = []

    def fake_convert(source: Path, out: Path) -> None:
        conversions.append(out)
        tiny.model.save_pretrained(out)
        tiny.tokenizer.save_pretrained(out)

    monkeypatch.setattr(gguf_cache, "_convert", fake_convert)
    cfg = load_config("local", [f"runtime.cache_dir={tmp_path}"])
    folder = gguf_cache.ensure_smollm2_folder(tmp_path)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert gguf_cache.cache_problems(folder) == [] and len(conversions) == 1
    assert gguf_cache.ensure_smollm2_folder(tmp_path) == folder and len(conversions) == 1  # complete: reused

    (folder / "model.safetensors").unlink()
    assert gguf_cache.cache_problems(folder) == ["model.safetensors is missing"]
    check_model(cfg.model, cfg.runtime)  # the preflight passes: the cache is rebuilt at load
    assert len(conversions) == 1
    lm = load_language_model(cfg.model, cfg.runtime)  # rebuilds, then loads
    assert len(conversions) == 2 and torch.equal(lm.model.lm_head.weight, tiny.model.lm_head.weight)

    with (folder / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    assert gguf_cache.cache_problems(folder)[0].startswith("model.safetensors has 1000 bytes")
    gguf_cache.ensure_smollm2_folder(tmp_path)
    assert len(conversions) == 3 and not gguf_cache.cache_problems(folder)

    # A cache converted before the marker listed its files: the folder itself is checked.
    (folder / COMPLETE_MARKER).write_text(json.dumps({"gguf_file": "x.gguf"}))
    (folder / "tokenizer.json").unlink()
    assert gguf_cache.cache_problems(folder) == [
        "has no tokenizer (tokenizer.json, tokenizer.model, spiece.model, sentencepiece.bpe.model, vocab.json, "
        "vocab.txt or *.tiktoken)"
    ]
    gguf_cache.ensure_smollm2_folder(tmp_path)
    assert len(conversions) == 4 and not gguf_cache.cache_problems(folder)
