"""Prompt format: a ChatML template with `enable_thinking`, a fixed system prompt and thinking delimiters.

The project template renders the same text for every model that uses ChatML (SmolLM2, SmolLM3 and
the tiny test model), with no date and a fixed system prompt so that data are reproducible:

- `enable_thinking=False`: the generation prompt ends with an empty, closed thinking span
  (`<think>\\n\\n</think>\\n`), as SmolLM3's own no-think mode does;
- `enable_thinking=True` and `open_thinking=True`: the generation prompt ends with `<think>\\n`,
  for models that have no thinking mode of their own (they would never emit `<think>`);
- `enable_thinking=True` and `open_thinking=False`: the model opens the span itself (SmolLM3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from llm_trm_core.errors import ConfigError

THINK_START = "<think>"
THINK_END = "</think>"

PROJECT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n' -}}"
    "{%- elif open_thinking is defined and open_thinking -%}"
    "{{- '<think>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class ThinkingDelimiters:
    """The thinking span's delimiters as found in the tokenizer at run time."""

    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]

    @property
    def single_tokens(self) -> bool:
        """True when both delimiters are one vocabulary token each (SmolLM3, the tiny model)."""
        return len(self.start_ids) == 1 and len(self.end_ids) == 1

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ThinkingDelimiters:
        start_ids = tuple(tokenizer.encode(THINK_START, add_special_tokens=False))
        end_ids = tuple(tokenizer.encode(THINK_END, add_special_tokens=False))
        if not start_ids or not end_ids:
            raise ConfigError("the tokenizer cannot encode the thinking delimiters <think> / </think>")
        return cls(THINK_START, THINK_END, start_ids, end_ids)


@dataclass(frozen=True)
class ChatFormat:
    """Turns a question into the LM prompt, in think or no-think mode."""

    tokenizer: PreTrainedTokenizerBase
    system_prompt: str
    thinking: Literal["native", "prompted"]
    delimiters: ThinkingDelimiters

    def messages(self, question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

    def prompt(self, question: str, enable_thinking: bool = True) -> str:
        kwargs: dict[str, Any] = {
            "enable_thinking": enable_thinking,
            "open_thinking": self.thinking == "prompted",
        }
        text = self.tokenizer.apply_chat_template(
            self.messages(question), tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert isinstance(text, str)
        return text


def make_chat_format(
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str,
    thinking: Literal["native", "prompted"],
    template: Literal["project", "model"],
) -> ChatFormat:
    """Install the chosen template on the tokenizer and find the thinking delimiters."""
    if template == "project":
        tokenizer.chat_template = PROJECT_CHAT_TEMPLATE
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError("model.chat_template=model, but the tokenizer has no chat template; use 'project'")
    delimiters = ThinkingDelimiters.from_tokenizer(tokenizer)
    if thinking == "native" and not delimiters.single_tokens:
        raise ConfigError(
            f"model.thinking=native needs <think>/</think> as single tokens, but this tokenizer splits them "
            f"into {len(delimiters.start_ids)}/{len(delimiters.end_ids)} tokens; set model.thinking=prompted"
        )
    return ChatFormat(tokenizer, system_prompt, thinking, delimiters)
