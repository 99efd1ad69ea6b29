"""Sampling answers after injected latents, and the log-probabilities of those answers.

The policy is the frozen LM conditioned on k latent input embeddings (from the TRM and projection):
pi(a | x) = prod_t p_LM(a_t | x, latents, a_<t). Sampling uses plain temperature sampling (no top-k or
top-p), so the log-probs computed here, on the same temperature-scaled logits, are exactly those of the
distribution the samples came from. Positions follow generate's convention (cumulative attention mask),
so a teacher-forced pass reproduces the sampling pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_trm_core.latent.reasoner import LatentReasoner


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # per sample (N = questions x G), group order
    completions: list[list[int]]  # sampled answer tokens, EOS included when produced
    truncated: list[bool]  # hit the answer budget without EOS
    texts: list[str]  # decoded answers (special tokens skipped)


def sample_answers(
    reasoner: LatentReasoner,
    prompt_ids: Sequence[list[int]],
    latents: torch.Tensor,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> Rollout:
    """One sampled answer per row (rows already repeated G times); seeded, global RNG untouched."""
    tok = reasoner.lm.tokenizer
    embeds, mask, _ = reasoner.input_embeddings(list(prompt_ids), latents)
    model: Any = reasoner.lm.model
    devices = [reasoner.device] if reasoner.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    completions, truncated = [], []
    for row in out.cpu().tolist():
        if tok.eos_token_id in row:
            completions.append(row[: row.index(tok.eos_token_id) + 1])
            truncated.append(False)
        else:
            completions.append(row[:max_new_tokens])
            truncated.append(len(row) >= max_new_tokens)
    texts = [str(tok.decode(ids, skip_special_tokens=True)) for ids in completions]
    return Rollout([list(p) for p in prompt_ids], completions, truncated, texts)


@dataclass
class AnswerLogProbs:
    logp: torch.Tensor  # (N, T) log-prob of each answer token (0 at padding)
    entropy: torch.Tensor  # (N, T) entropy of the sampling distribution at each answer position
    mask: torch.Tensor  # (N, T) 1 for real answer tokens


def answer_log_probs(
    reasoner: LatentReasoner,
    prompt_ids: Sequence[list[int]],
    latents: torch.Tensor,
    completions: Sequence[list[int]],
    temperature: float,
) -> AnswerLogProbs:
    """Teacher-forced [prompt, latents, answer]; log-softmax in float32 of logits / temperature, with the LM
    head applied only at answer positions. Differentiable in the latents (and LoRA, if any)."""
    embeds, attention, starts = reasoner.input_embeddings(list(prompt_ids), latents, [list(c) for c in completions])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    model: Any = reasoner.lm.model
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions)[0]
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
    logits = model.get_output_embeddings()(picked).float() / temperature
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    return AnswerLogProbs(logp, entropy, mask)
