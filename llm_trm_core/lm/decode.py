"""Token-by-token decoding from a KV cache that drops finished rows as it goes.

`transformers`' `generate` keeps every row of a batch in every step until the last row ends, so a batch in
which most answers stop after ten tokens and one runs to the budget pays the full budget for every row.
On a CPU a decode step's cost grows with the rows it carries (about 3 ms per row for SmolLM2-135M on two
cores, beside a fixed ~100 ms), so `decode` removes finished rows from the batch and from the cache
whenever a quarter of the rows it carries have ended (`docs/performance.md`).

Each step is greedy (`temperature == 0`: argmax of the logits) or samples from `softmax(logits /
temperature)` by inverting its cumulative distribution at one uniform draw per row from the global
generator (`llm_trm_core/lm/sampling.py`). `generate` draws with `torch.multinomial`, which on this CPU
takes 39-65 ms for 32 rows of a 49k-word vocabulary against 2.3-2.7 ms this way: the distribution is the
same, the draws are not `generate`'s. Positions continue from the last input position of each row, the
convention of `generate` and of `llm_trm_core/lm/prefix.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from llm_trm_core.lm.sampling import sample_rows

COMPACT_FRACTION = 0.25  # drop finished rows once this share of the carried rows has ended


def pick_tokens(logits: torch.Tensor, temperature: float, entropy: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: argmax (temperature 0) or a draw from softmax(logits / temperature), in float32.
    `entropy` (B,), when given, receives the entropy of each row's sampling distribution (nats), taken as
    log Z - E_p[s] over the shifted scores s, without a logarithm per word."""
    scores = logits.float()
    if temperature == 0:
        if entropy is not None:
            entropy.zero_()
        return scores.argmax(-1)
    shifted = scores / temperature
    shifted -= shifted.amax(-1, keepdim=True)
    weights = shifted.exp()  # unnormalised probabilities, the largest 1
    if entropy is not None:
        total = weights.sum(-1)
        entropy.copy_(total.log() - (weights * shifted).sum(-1) / total)
    return sample_rows(weights)


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    cache: DynamicCache,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens (B, steps) after feeding `embeds` (B, S, D) on top of `cache`: `mask` is the attention mask
    over cache and inputs (B, cached + S), `positions` the inputs' positions (B, S). A row's tokens end with
    its EOS and are padded after it; `steps` is the longest row's length (at most `max_new_tokens`).
    `entropy` (B, max_new_tokens), when given, receives at each new token the entropy of the distribution it
    was sampled from (0 where a row has no token), what a teacher-forced pass over the tokens would measure
    without running one."""
    body: Any = model.base_model
    head = model.get_output_embeddings()
    rows = embeds.shape[0]
    out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long)
    carried = torch.arange(rows)  # the original row of each row still in the batch
    finished = torch.zeros(rows, dtype=torch.bool)
    next_position = positions[:, -1:] + 1
    hidden = body(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    )[0][:, -1]
    steps = 0
    if entropy is not None:
        entropy.zero_()
    for step in range(max_new_tokens):
        spread = None if entropy is None else hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        tokens = pick_tokens(head(hidden), temperature, spread).cpu()
        live = ~finished
        out[carried[live], step] = tokens[live]
        if entropy is not None and spread is not None:
            entropy[carried[live], step] = spread.cpu()[live]
        finished |= tokens == eos_token_id
        steps = step + 1
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if int(finished.sum()) >= max(1, int(COMPACT_FRACTION * len(carried))):
            keep = (~finished).nonzero().squeeze(1)
            device_keep = keep.to(mask.device)
            cache.batch_select_indices(device_keep)  # ReservedLayer keeps its room
            carried, tokens, finished = carried[keep], tokens[keep], finished[keep]
            mask, next_position = mask.index_select(0, device_keep), next_position.index_select(0, device_keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        hidden = body(
            input_ids=tokens.unsqueeze(1).to(mask.device), attention_mask=mask, position_ids=next_position,
            past_key_values=cache, use_cache=True,
        )[0][:, -1]  # fmt: skip
        next_position = next_position + 1
    return out[:, :steps]
