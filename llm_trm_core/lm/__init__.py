"""Language models: loading, chat format and thinking delimiters."""

from llm_trm_core.lm.chat import ChatFormat, ThinkingDelimiters
from llm_trm_core.lm.loader import (
    LoadedLM,
    ModelInfo,
    load_language_model,
    release_shared_language_model,
    shared_language_model,
    token_texts,
)

__all__ = [
    "ChatFormat",
    "LoadedLM",
    "ModelInfo",
    "ThinkingDelimiters",
    "load_language_model",
    "release_shared_language_model",
    "shared_language_model",
    "token_texts",
]
