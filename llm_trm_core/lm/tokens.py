"""Token-level helpers every LM caller shares: the prompt prefix common to every question, the token at a
character, cutting a generation at end-of-sequence, and left-padded batches for `generate`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from llm_trm_core.lm.chat import ChatFormat


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_prompt_prefix(tokenizer: PreTrainedTokenizerBase, chat: ChatFormat, enable_thinking: bool) -> list[int]:
    """The token prefix every prompt of this chat format shares (the system block): the common prefix of
    two prompts that differ only in the question."""
    a = list(tokenizer(chat.prompt("0", enable_thinking=enable_thinking), add_special_tokens=False).input_ids)
    b = list(tokenizer(chat.prompt("1", enable_thinking=enable_thinking), add_special_tokens=False).input_ids)
    return a[: common_prefix_length(a, b)]


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token covering character `char` (or the first token starting after it; len(offsets) if
    none does), from a tokenizer's offset mapping."""
    for i, (start, end) in enumerate(offsets):
        if start <= char < end or start >= char:
            return i
    return len(offsets)


def cut_at_eos(ids: list[int], eos: int | None, keep_eos: bool = False) -> tuple[list[int], bool]:
    """The ids before the first end-of-sequence token (through it with `keep_eos`), and whether there was one."""
    if eos is None or eos not in ids:
        return ids, False
    return ids[: ids.index(eos) + int(keep_eos)], True


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of `sequences` left-padded to the longest: generation continues every row at
    the same position."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask
