"""Sampling answers after injected latents, and the log-probabilities of those answers.

The policy is the frozen LM conditioned on k latent input embeddings (from the TRM and projection):
pi(a | x) = prod_t p_LM(a_t | x, latents, a_<t). Sampling is plain temperature sampling by our own decode
loop (llm_trm_core/lm/decode.py: no top-k, top-p, penalty or any processor a model's generation_config.json
could add), so the log-probs computed here, on the same temperature-scaled logits, are exactly those of the
distribution the samples came from. Positions follow generate's convention (cumulative attention mask),
so a teacher-forced pass reproduces the sampling pass.

Both run on a `PromptPrefix` (llm_trm_core/lm/prefix.py): each question's prompt goes through the LM once
per step and its G samples, the old, reference and gradient passes continue from that cache with only
`[last prompt token, latents, answer]` of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_trm_core.latent.reasoner import LatentReasoner
from llm_trm_core.lm.prefix import PromptPrefix, forward_suffix, generate_after
from llm_trm_core.lm.tokens import cut_at_eos


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # per sample (N = questions x G), group order
    completions: list[list[int]]  # sampled answer tokens, EOS included when produced
    truncated: list[bool]  # hit the answer budget without EOS
    texts: list[str]  # decoded answers (special tokens skipped)
    entropy: list[float]  # per sample: summed entropy of the sampling distribution over its completion tokens


def sample_answers(
    reasoner: LatentReasoner,
    prefix: PromptPrefix,
    latents: torch.Tensor,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> Rollout:
    """One sampled answer per row of `prefix` (rows already repeated G times); seeded, global RNG untouched.
    The entropy of each token's sampling distribution is taken while sampling (no teacher-forced pass)."""
    tok = reasoner.lm.tokenizer
    devices = [reasoner.device] if reasoner.device.type == "cuda" else []
    spread = torch.zeros(len(prefix.ids), max_new_tokens)
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = generate_after(
            reasoner.lm.model, prefix, latents, max_new_tokens, int(tok.eos_token_id), int(tok.pad_token_id or 0),
            temperature=temperature, entropy=spread,
        )  # fmt: skip
    completions, truncated, entropy = [], [], []
    for row, row_spread in zip(out.cpu().tolist(), spread.tolist(), strict=True):
        answer, ended = cut_at_eos(row, tok.eos_token_id, keep_eos=True)
        completions.append(answer if ended else row[:max_new_tokens])
        truncated.append(not ended and len(row) >= max_new_tokens)
        entropy.append(float(sum(row_spread[: len(completions[-1])])))
    texts = [str(tok.decode(ids, skip_special_tokens=True)) for ids in completions]
    return Rollout([list(p) for p in prefix.ids], completions, truncated, texts, entropy)


@dataclass
class AnswerLogProbs:
    logp: torch.Tensor  # (N, T) log-prob of each answer token (0 at padding)
    entropy: torch.Tensor  # (N, T) entropy of the sampling distribution at each answer position
    mask: torch.Tensor  # (N, T) 1 for real answer tokens


def answer_log_probs(
    reasoner: LatentReasoner,
    prefix: PromptPrefix,
    latents: torch.Tensor,
    completions: Sequence[list[int]],
    temperature: float,
) -> AnswerLogProbs:
    """Teacher-forced [prompt, latents, answer] (the prompt from `prefix`'s cache); log-softmax in float32 of
    logits / temperature, with the LM head applied only at answer positions. Differentiable in the latents
    (and in LoRA, if any, when the prefix was made with gradients)."""
    model: Any = reasoner.lm.model
    hidden, starts = forward_suffix(model, prefix, latents, [list(c) for c in completions])
    width = max(len(c) for c in completions)
    offsets = torch.arange(width, device=hidden.device)
    start = torch.tensor(starts, device=hidden.device).unsqueeze(1)
    mask = torch.zeros(len(completions), width, device=hidden.device)
    targets = torch.zeros(len(completions), width, dtype=torch.long, device=hidden.device)
    for row, ids in enumerate(completions):
        mask[row, : len(ids)] = 1
        targets[row, : len(ids)] = torch.tensor(ids, device=hidden.device)
    index = (start - 1 + offsets).clamp(max=hidden.shape[1] - 1)  # state before token t predicts token t
    picked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logp, entropy = token_log_probs(model.get_output_embeddings(), picked, targets, temperature)
    return AnswerLogProbs(logp * mask, entropy * mask, mask)


LOGIT_CHUNK = 16  # answer positions whose float32 vocabulary logits exist at once (per sequence)


def token_log_probs(
    head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int = LOGIT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy at each position of `states` (N, T, D) under softmax(head(states) / T),
    without the (N, T, V) float32 logits: positions go through the head `chunk` at a time, each chunk under
    activation checkpointing, so forward and backward hold one chunk's (N, chunk, V) logits (SmolLM3's
    128256-word head: 32 x 256 positions are 4.2 GB of float32 logits at once, 0.26 GB in chunks of 16).
    Equal to the full computation (tests/test_flagship.py)."""
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float() / temperature
        log_probs = logits.log_softmax(-1)
        return log_probs.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)

    logps, entropies = [], []
    for begin in range(0, states.shape[1], chunk):
        h, t = states[:, begin : begin + chunk], targets[:, begin : begin + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(piece, h, t, use_reentrant=False)
        else:
            lp, ent = piece(h, t)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps, 1), torch.cat(entropies, 1)
