"""A tiny random SmolLM3 with a byte-level BPE tokenizer trained on the spot.

Nothing is downloaded: the tokenizer is trained (deterministically) on Python's bundled
documentation topics plus the project's prompt vocabulary, and has `<think>`/`</think>` and the
ChatML markers as single special tokens. Every stage runs in seconds on it; tests use it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, SmolLM3Config, SmolLM3ForCausalLM

from llm_trm_core.config import SYSTEM_PROMPT, TinyModelConfig
from llm_trm_core.data.corpus import python_doc_topics
from llm_trm_core.lm.chat import PROJECT_CHAT_TEMPLATE, THINK_END, THINK_START

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK_START, THINK_END]
_TRAINING_EXTRA = [
    SYSTEM_PROMPT,
    "system user assistant #### The answer is 0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = $ % .",
]


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Deterministic byte-level BPE with ChatML and thinking markers as special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [*_TRAINING_EXTRA, *python_doc_topics(limit=40)]
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, THINK_START, THINK_END],
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = PROJECT_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> SmolLM3ForCausalLM:
    """Random SmolLM3 weights, seeded without touching the global RNG."""
    config = SmolLM3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SmolLM3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
