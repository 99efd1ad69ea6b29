"""The GRPO objective on tensors: group-relative advantages, the clipped ratio loss, the k3 KL.

Shapes: rewards (N,) with N = groups x G in group order; log-probs and masks (N, T) over answer tokens.
Same formulas as TRL's GRPOTrainer (v1.16 `_compute_loss`): Bessel std, eps 1e-4 in the std division,
`min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`, k3 = exp(ref - logp) - (ref - logp) - 1.
Aggregation takes the global counts, so micro-batches sum to the full-batch loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["dapo", "grpo", "dr_grpo"]
RewardScale = Literal["none", "group", "batch"]


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN (0 with fewer than two values)."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim, keepdim=True) if dim is not None else valid.sum()
    mean = torch.nansum(x, dim, keepdim=True) / count.clamp(min=1) if dim is not None else torch.nansum(x) / count
    squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    total = squares.sum(dim, keepdim=True) if dim is not None else squares.sum()
    std = (total / (count - 1).clamp(min=1)).sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: RewardScale = "none", eps: float = 1e-4
) -> torch.Tensor:
    """A_i = R_i - mean of its group, optionally divided by the group's (or whole batch's) std. A NaN reward
    (no reward function applied) is left out of the statistics and gets advantage 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    mean = torch.nansum(grouped, 1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    advantages = grouped - mean
    if scale == "group":
        advantages = advantages / (_nanstd(grouped, 1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (_nanstd(rewards) + eps)
    return torch.where(valid, advantages, torch.zeros_like(advantages)).reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) bool: groups whose (applicable) rewards are all equal carry no learning signal."""
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    high = torch.where(valid, grouped, torch.full_like(grouped, -torch.inf)).max(1).values
    low = torch.where(valid, grouped, torch.full_like(grouped, torch.inf)).min(1).values
    return (high <= low) | (valid.sum(1) < 2)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: unbiased and non-negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar, differentiable
    clipped_tokens: torch.Tensor  # scalar count of masked tokens on the clipped branch
    kl_sum: torch.Tensor  # scalar sum of k3 over masked tokens (0 without a reference)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "dapo",
    max_len: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> LossTerms:
    """The clipped surrogate (+ beta k3) aggregated as `loss_type`; `num_sequences` / `num_tokens` are the
    full batch's counts when this is one micro-batch of it (default: this batch's own). As in TRL they count
    every sequence of the rollout batch (and every unmasked token), including groups left out of the
    computation because their advantages are all 0: skipping such groups saves work and never changes the
    step size."""
    high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    old_logp = old_logp.detach()  # the behaviour policy is a constant of the update (TRL)
    ref_logp = ref_logp.detach() if ref_logp is not None else None
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon_low, 1 + high) * adv
    per_token = -torch.min(unclipped, clipped)
    on_clip = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        per_token = per_token + beta * kl
    n_seq = num_sequences if num_sequences is not None else logp.shape[0]
    n_tok = num_tokens if num_tokens is not None else float(mask.sum().clamp(min=1))
    if loss_type == "dapo":
        loss = (per_token * mask).sum() / max(n_tok, 1.0)
    elif loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(n_seq, 1)
    elif loss_type == "dr_grpo":
        if max_len is None:
            raise ValueError("dr_grpo needs max_len (the answer budget)")
        loss = (per_token * mask).sum() / (max(n_seq, 1) * max_len)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use dapo, grpo or dr_grpo")
    return LossTerms(loss, (on_clip.to(mask.dtype) * mask).sum().detach(), (kl * mask).sum().detach())
