"""A prompt run through the LM once, continued many times: the shared-prefix KV cache.

Every latent arm, every GRPO sample of a question, and every teacher-forced pass over an answer starts
with the same prompt tokens. `prefill` runs the left-padded prompts through the transformer body once,
all but each prompt's last token, and keeps the key/value cache; a continuation then feeds only its own
suffix, `[last prompt token, k latents, answer ...]`, attending to the cached prompt:

- `PromptPrefix.select(rows)` gives a fresh cache for any rows, repeated or reordered (G samples of one
  question, one micro-batch of them), by indexing the cached tensors: the prompt is never re-run;
- `forward_suffix` runs a suffix batch (right-padded, so real tokens keep their positions) and returns its
  last-layer states; gradients flow into the suffix (latents, adapters) but not into the cached prompt;
- `generate_after` decodes from a suffix (greedy or sampled) with `llm_trm_core/lm/decode.py`, which drops
  finished rows from the batch and the cache as it goes.

Positions follow `generate`'s convention (cumulative attention mask minus one), so a teacher-forced suffix
sees exactly the positions the decoding pass saw. The cache is only valid while the weights it was made
with do not change: a prefix is made under the adapter state of its use and, when adapters train, with
gradients (`prefill(..., grad=True)`) and rebuilt for every optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from llm_trm_core.hidden_states import capture_layer
from llm_trm_core.lm.decode import decode
from llm_trm_core.lm.tokens import common_prefix_length, left_pad


@dataclass
class PromptPrefix:
    """Left-padded prompts whose first `width - 1` columns are cached (the KV of every prompt token but the last)."""

    ids: list[list[int]]
    mask: torch.Tensor  # (B, width) 1 at real prompt tokens
    last: torch.Tensor  # (B, 1, D) input embedding of each prompt's last token
    keys: list[torch.Tensor]  # per layer (B, heads, width - 1, head_dim)
    values: list[torch.Tensor]

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def select(self, rows: Sequence[int]) -> PromptPrefix:
        """The prefix of `rows` (indices into this batch, repeats allowed), sharing no cache storage."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        return PromptPrefix(
            [self.ids[i] for i in rows],
            self.mask.index_select(0, index),
            self.last.index_select(0, index),
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
        )

    def unpadded(self, row: int) -> PromptPrefix:
        """Row `row` alone, without its left padding, in storage of its own (for `stack`)."""
        start = self.width - len(self.ids[row])
        return PromptPrefix(
            [list(self.ids[row])],
            self.mask[row : row + 1, start:].clone(),
            self.last[row : row + 1].clone(),
            [k[row : row + 1, :, start:].clone() for k in self.keys],
            [v[row : row + 1, :, start:].clone() for v in self.values],
        )

    @staticmethod
    def stack(prompts: Sequence[PromptPrefix]) -> PromptPrefix:
        """Single unpadded prompts (`unpadded`) joined into one left-padded batch. Padding columns hold zeros:
        they are masked, so what they hold does not reach any real position."""
        width = max(p.width for p in prompts)
        first = prompts[0]
        mask = first.mask.new_zeros(len(prompts), width)
        keys = [k.new_zeros(len(prompts), k.shape[1], width - 1, k.shape[3]) for k in first.keys]
        values = [v.new_zeros(len(prompts), v.shape[1], width - 1, v.shape[3]) for v in first.values]
        for row, p in enumerate(prompts):
            start = width - p.width
            mask[row, start:] = p.mask[0]
            for layer, (k, v) in enumerate(zip(p.keys, p.values, strict=True)):
                keys[layer][row, :, start:] = k[0]
                values[layer][row, :, start:] = v[0]
        return PromptPrefix([p.ids[0] for p in prompts], mask, torch.cat([p.last for p in prompts]), keys, values)

    def cache(self, reserve: int = 0) -> DynamicCache:
        """A new cache holding the prefix (extended in place by whoever runs on it), with room for `reserve`
        more positions per layer before it has to grow."""
        cache = reserved_cache(reserve + self.width)
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(k, v, layer)
        return cache


def reserved_cache(positions: int) -> DynamicCache:
    """An empty cache whose layers have room for `positions` positions each (they grow past it if they must):
    pass it as `past_key_values` to `generate` with room for the prompt and every new token."""
    cache = DynamicCache()
    # the cache calls this factory for each layer it has not seen (a class in transformers' annotation)
    cache.layer_class_to_replicate = partial(ReservedLayer, positions)  # type: ignore[assignment]
    return cache


class ReservedLayer(DynamicLayer):
    """A cache layer that writes new positions into room reserved ahead instead of concatenating.

    `DynamicLayer` concatenates on every update, so a decode step copies the whole cache of every layer: at
    128 rows and a few hundred positions that copy costs more than the step's attention. This layer keeps
    `keys`/`values` as views of a larger buffer and writes each step's states in place. The first update
    allocates room for `positions` (or what it brings, if more); it reallocates (at least doubling) only when
    the buffer is full or when something outside `update` replaced `keys`, whose result it then adopts; batch
    selection keeps the room."""

    def __init__(self, positions: int) -> None:
        super().__init__()
        self.positions = positions
        self._key_room: torch.Tensor | None = None
        self._value_room: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        keys, values = self._key_room, self._value_room
        if keys is None or values is None or not self._extends(keys, length, end, key_states.shape[0]):
            capacity = max(end, self.positions, 2 * length)
            keys = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            values = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if length and self.keys is not None and self.values is not None:
                keys[:, :, :length] = self.keys
                values[:, :, :length] = self.values
            self._key_room, self._value_room = keys, values
        keys[:, :, length:end] = key_states
        values[:, :, length:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return keys[:, :, :end], values[:, :, :end]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows `indices`, with the room reserved ahead of them (one copy)."""
        if self._key_room is None or self._value_room is None:
            super().batch_select_indices(indices)
            return
        length = self.get_seq_length()
        self._key_room = self._key_room.index_select(0, indices)
        self._value_room = self._value_room.index_select(0, indices)
        self.keys, self.values = self._key_room[:, :, :length], self._value_room[:, :, :length]

    def _extends(self, room: torch.Tensor, length: int, end: int, rows: int) -> bool:
        """Whether the current states are the first `length` positions of `room`, with room up to `end`."""
        held = length == 0 or (self.keys is not None and self.keys.data_ptr() == room.data_ptr())
        return held and end <= room.shape[-2] and room.shape[0] == rows


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """`generate`'s position ids: the cumulative attention mask minus one (0 at left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# prompt caches a stage keeps in memory to reuse instead of prefilling the prompts again (evaluation chunks,
# latent training's prompts across epochs, GRPO's held-out check across training), at most this many bytes
KEPT_PREFIX_BYTES = 1 << 30

SHARED_HEAD_MIN = 8  # common first tokens worth running once for every row (the chat template's system block)


def prefill(model: PreTrainedModel, ids: Sequence[Sequence[int]], pad_id: int, grad: bool = False) -> PromptPrefix:
    """Run every prompt but its last token through the LM body once (no gradients unless `grad`, and never
    inside `torch.no_grad()`); see `prefill_states`."""
    return prefill_states(model, ids, pad_id, grad)[0]


def prefill_states(
    model: PreTrainedModel,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    grad: bool = False,
    layer_index: int | None = None,
) -> tuple[PromptPrefix, torch.Tensor | None]:
    """`prefill`, and the output of layer `layer_index` at every cached position, left-padded (B, width - 1,
    D), when it is given.

    The prompts' common first tokens (the system block every chat prompt starts with; at least
    `SHARED_HEAD_MIN` of them) run once, as one row: their keys and values do not depend on what follows, so
    every row's cache gets a copy, and only each row's own remainder runs batched, attending to them. The
    cache then holds what a left-padded forward of the whole prompts makes (up to float rounding)."""
    batch, mask = left_pad(ids, pad_id)
    device = next(model.parameters()).device
    batch, mask = batch.to(device), mask.to(device)
    hook: contextlib.AbstractContextManager[list[torch.Tensor]] = (
        contextlib.nullcontext([]) if layer_index is None else capture_layer(model, layer_index)
    )
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    head = _shared_head(ids)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), hook as captured:
        if batch.shape[1] > 1 and (len(ids) == 1 or head < SHARED_HEAD_MIN):
            cache = DynamicCache()
            body: Any = model.base_model
            body(
                input_ids=batch[:, :-1], attention_mask=mask[:, :-1], position_ids=positions_of(mask)[:, :-1],
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            keys, values = _keys_values(cache)
        elif batch.shape[1] > 1:
            keys, values = _prefill_after_shared_head(model, ids, batch, head, pad_id, captured)
        last = model.get_input_embeddings()(batch[:, -1:])
    states = captured[0] if captured else None
    return PromptPrefix([list(s) for s in ids], mask, last, keys, values), states


def _shared_head(ids: Sequence[Sequence[int]]) -> int:
    """How many first tokens every prompt shares, leaving each prompt at least its last token of its own."""
    longest_allowed = min(len(s) for s in ids) - 1
    return max(0, min([longest_allowed, *(common_prefix_length(ids[0], seq) for seq in ids[1:])]))


def _prefill_after_shared_head(
    model: PreTrainedModel,
    ids: Sequence[Sequence[int]],
    batch: torch.Tensor,
    head: int,
    pad_id: int,
    captured: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The shared head run once, each row's remainder (all but the last token) batched after copies of its
    cache; keys and values (and the captured layer states) re-laid out as one left-padded forward makes them."""
    rows, device = len(ids), batch.device
    body: Any = model.base_model
    shared = DynamicCache()
    body(
        input_ids=batch.new_tensor([list(ids[0][:head])]), position_ids=torch.arange(head, device=device)[None],
        past_key_values=shared, use_cache=True,
    )  # fmt: skip
    cache = DynamicCache()
    for index, (k, v) in enumerate(zip(*_keys_values(shared), strict=True)):
        cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), index)
    rests = [list(seq[head:-1]) for seq in ids]
    own = max(len(r) for r in rests)
    if own:
        rest, rest_mask = left_pad(rests, pad_id)
        full = torch.cat([rest_mask.new_ones(rows, head), rest_mask], dim=1).to(device)
        body(
            input_ids=rest.to(device), attention_mask=full, position_ids=positions_of(full)[:, head:],
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
    # cache columns are [head | padding | own tokens]; a left-padded forward has [padding | head | own tokens]
    padding = torch.tensor([own - len(r) for r in rests], device=device)[:, None]
    column = torch.arange(head + own, device=device)[None]
    source = torch.where(
        column < padding, head + column, torch.where(column < padding + head, column - padding, column)
    )
    if captured:
        states = captured[0].expand(rows, -1, -1)
        if own:
            states = torch.cat([states, captured[1]], dim=1)
        captured[:] = [states.gather(1, source[:, :, None].expand(-1, -1, states.shape[-1]))]

    def relaid(t: torch.Tensor) -> torch.Tensor:
        return t.gather(2, source[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))

    keys, values = _keys_values(cache)
    return [relaid(k) for k in keys], [relaid(v) for v in values]


def _keys_values(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def suffix_inputs(
    prefix: PromptPrefix, middle: torch.Tensor | None, answers: Sequence[Sequence[int]] | None, embed: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The suffix `[last prompt token, middle (k latents), answer]` per row, right-padded: (embeds (B, S, D),
    the full attention mask (B, width - 1 + S), the suffix positions (B, S), each row's answer start in the
    suffix)."""
    parts = [prefix.last]
    if middle is not None:
        parts.append(middle.to(prefix.last.dtype))
    head = torch.cat(parts, dim=1)
    rows, n = head.shape[0], head.shape[1]
    lengths = [len(a) for a in answers] if answers is not None else [0] * rows
    width = n + max(lengths, default=0)
    embeds = head.new_zeros(rows, width, head.shape[-1])
    embeds[:, :n] = head
    suffix_mask = torch.zeros(rows, width, dtype=prefix.mask.dtype, device=prefix.mask.device)
    suffix_mask[:, :n] = 1
    if answers is not None:
        for row, answer in enumerate(answers):
            if answer:
                tokens = torch.tensor(list(answer), dtype=torch.long, device=prefix.mask.device)
                embeds[row, n : n + len(answer)] = embed(tokens).to(embeds.dtype)
                suffix_mask[row, n : n + len(answer)] = 1
    full_mask = torch.cat([prefix.mask[:, :-1], suffix_mask], dim=1)
    positions = positions_of(full_mask)[:, prefix.width - 1 :]
    return embeds, full_mask, positions, [n] * rows


def forward_suffix(
    model: PreTrainedModel,
    prefix: PromptPrefix,
    middle: torch.Tensor | None = None,
    answers: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Last-layer states (B, S, D) of the suffix after the cached prompt, and each row's answer start in it
    (the state at start - 1 + t predicts answer token t)."""
    embeds, mask, positions, starts = suffix_inputs(prefix, middle, answers, model.get_input_embeddings())
    body: Any = model.base_model
    hidden = body(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
        past_key_values=prefix.cache(reserve=embeds.shape[1]),
        use_cache=True,
    )[0]  # fmt: skip
    return hidden, starts


def generate_after(
    model: PreTrainedModel,
    prefix: PromptPrefix,
    middle: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens (B, steps) decoded after the cached prompt and `[last prompt token, middle]`: greedy, or
    sampled at `temperature` (llm_trm_core/lm/decode.py; finished rows leave the batch as it goes; `entropy`
    (B, max_new_tokens) receives each new token's sampling entropy)."""
    embeds, mask, positions, _ = suffix_inputs(prefix, middle, None, model.get_input_embeddings())
    cache = prefix.cache(reserve=embeds.shape[1] + max_new_tokens)
    return decode(
        model,
        cache,
        embeds,
        mask,
        positions,
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        temperature=temperature,
        entropy=entropy,
    )
