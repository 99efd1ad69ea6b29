"""One GRPO step for the latent policy: rollout, rewards, advantages, clipped update, metrics.

    questions -> LM states -> TRM -> projection -> latents (trainable) -> G sampled answers each
    rewards (TRL-signature functions) -> group-relative advantages -> zero-variance groups dropped
    -> teacher-forced log-probs with gradient -> clipped ratio loss (+ beta k3 to the reference) -> step

On-policy by default (updates_per_rollout = 1: ratio 1, old log-probs = detached current ones). The
reference policy is the same frozen LM with the starting TRM and projection (and adapters off when a
LoRA adapter trains). Every random draw is seeded by (seed, step), so a run resumed from a checkpoint
takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from llm_trm_core.config import GRPOConfig
from llm_trm_core.errors import UserError
from llm_trm_core.grpo.objective import group_advantages, grpo_loss, k3_kl, zero_variance_groups
from llm_trm_core.grpo.rewards import RewardFunction, combined_rewards, correctness_reward
from llm_trm_core.grpo.rollout import answer_log_probs, sample_answers
from llm_trm_core.latent.reasoner import LatentReasoner, PromptBatch, adapters_off
from llm_trm_core.training.loop import require_finite

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


@dataclass
class GRPOLearner:
    policy: LatentReasoner
    reference: LatentReasoner  # same LM, frozen starting TRM + projection
    cfg: GRPOConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rewards: Sequence[tuple[RewardFunction, float]]
    seed: int
    reference_adapters_off: bool = False

    def _latents(self, reasoner: LatentReasoner, batch: PromptBatch) -> torch.Tensor:
        latents = reasoner.latents(batch, "trm_latent")
        assert latents is not None
        return latents.repeat_interleave(self.cfg.group_size, 0)

    def _chunks(self, rows: list[int]) -> list[list[int]]:
        size = self.cfg.micro_batch
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def step(self, step: int, questions: Sequence[str], columns: dict[str, Sequence[Any]]) -> dict[str, Any]:
        g = self.cfg
        batch = self.policy.encode_prompts(list(questions))
        self.policy.check_context(batch, g.max_completion_tokens)
        question_of = [q for q in range(len(batch.ids)) for _ in range(g.group_size)]  # sample -> its question
        model = self.policy.lm.model
        # each prompt through the LM once (llm_trm_core/lm/prefix.py); the reference reads it with adapters off
        prefix = self.policy.prompt_prefix(batch)
        ref_prefix = prefix
        if self.reference_adapters_off and g.beta:
            with adapters_off(model):
                ref_prefix = self.policy.prefix(batch.ids)
        with torch.no_grad():
            latents = self._latents(self.policy, batch)
            ref_latents = self._latents(self.reference, batch)
        rollout = sample_answers(self.policy, prefix.select(question_of), latents, g.temperature,
                                 g.max_completion_tokens, step_seed(self.seed, step))  # fmt: skip
        repeated = {name: [v for v in values for _ in range(g.group_size)] for name, values in columns.items()}
        repeated["prompts"] = [q for q in questions for _ in range(g.group_size)]
        repeated["completion_ids"] = rollout.completions
        total, parts = combined_rewards(self.rewards, rollout.texts, **repeated)
        rewards = torch.tensor(total, dtype=torch.float32)
        if torch.isinf(rewards).any() or any(
            v is not None and v != v
            for values in parts.values()
            for v in values  # NaN returned by a function
        ):
            raise UserError("a reward function returned a non-finite value; rewards must be finite floats or None")
        scored = ~torch.isnan(rewards)  # no reward function applied: out of the statistics and the loss
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards)
        flat = zero_variance_groups(rewards, g.group_size)
        counted = scored.clone()  # the loss normaliser's sequences: every scored one (TRL)
        if g.mask_truncated:
            counted &= ~torch.tensor(rollout.truncated)
        keep = counted.clone()
        if g.skip_zero_variance and not g.beta:  # advantage 0 and no KL term: their loss is exactly 0
            keep &= ~flat.repeat_interleave(g.group_size)
        rows = [i for i in range(len(rollout.texts)) if keep[i]]
        n_counted = int(counted.sum())
        device = self.policy.device

        # No-grad pass, only where the loss needs more than the gradient pass gives: off-policy (several updates
        # per rollout) every sample's old log-probs; with beta > 0 the reference's log-probs (and the KL to it),
        # as in TRL. On-policy (one update, TRL's num_iterations=1) the old log-probs are the gradient pass's own,
        # detached. The entropy is the sampling pass's (taken while decoding), so no pass runs for it.
        on_policy = g.updates_per_rollout == 1
        measured = [] if on_policy and not g.beta else list(range(len(rollout.texts)))
        old_logp: dict[int, torch.Tensor] = {}
        ref_logp: dict[int, torch.Tensor] = {}
        kl_sum = kl_tokens = 0.0
        with torch.no_grad():
            for chunk in self._chunks(measured):
                comps = [rollout.completions[i] for i in chunk]
                asked = [question_of[i] for i in chunk]
                cur = answer_log_probs(self.policy, prefix.select(asked), latents[chunk], comps, g.temperature)
                if g.beta:
                    with adapters_off(model) if self.reference_adapters_off else nullcontext():
                        ref = answer_log_probs(
                            self.reference, ref_prefix.select(asked), ref_latents[chunk], comps, g.temperature
                        )
                    kl_sum += float((k3_kl(cur.logp, ref.logp) * cur.mask).sum())
                    kl_tokens += float(cur.mask.sum())
                    for j, i in enumerate(chunk):
                        ref_logp[i] = ref.logp[j]
                for j, i in enumerate(chunk):
                    old_logp[i] = cur.logp[j]

        loss_value = clipped = grad_norm = 0.0
        kept_tokens = float(sum(len(rollout.completions[i]) for i in rows))
        counted_tokens = float(sum(len(rollout.completions[i]) for i in range(len(rollout.texts)) if counted[i]))
        if rows:
            for _ in range(g.updates_per_rollout):
                self.optimizer.zero_grad(set_to_none=True)
                for chunk in self._chunks(rows):
                    comps = [rollout.completions[i] for i in chunk]
                    grad_latents = self._latents(self.policy, batch)[chunk]
                    # trained adapters change the prompt's states: run it with gradients, after the last update
                    live = self.policy.prefix(batch.ids, grad=True) if self.reference_adapters_off else prefix
                    cur = answer_log_probs(self.policy, live.select([question_of[i] for i in chunk]), grad_latents,
                                           comps, g.temperature)  # fmt: skip
                    width = cur.logp.shape[1]
                    if not all(i in old_logp for i in chunk):  # on-policy: the old log-probs are these
                        for j, i in enumerate(chunk):
                            old_logp[i] = cur.logp[j].detach()
                    terms = grpo_loss(
                        cur.logp,
                        torch.stack([old_logp[i][:width] for i in chunk]).to(device),
                        advantages[chunk].to(device),
                        cur.mask,
                        torch.stack([ref_logp[i][:width] for i in chunk]).to(device) if g.beta else None,
                        beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, loss_type=g.loss_type,
                        max_len=g.max_completion_tokens, num_sequences=n_counted, num_tokens=counted_tokens,
                    )  # fmt: skip
                    require_finite(terms.loss, "grpo", step, "grpo.lr", g.lr)  # the loop's policy (training/loop.py)
                    terms.loss.backward()
                    loss_value += float(terms.loss.detach()) / g.updates_per_rollout
                    clipped += float(terms.clipped_tokens)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, g.grad_clip))
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        if rows:  # the schedule counts policy updates (a step with no signal does not update)
            self.scheduler.step()
        with torch.no_grad():
            z, z_ref = self._latents(self.policy, batch), ref_latents
            shift = float((z - z_ref).norm(dim=-1).mean() / z_ref.norm(dim=-1).mean().clamp(min=1e-12))
        groups = len(questions)
        lengths = [len(c) for c in rollout.completions]
        metrics: dict[str, Any] = {
            "step": step + 1,
            "reward_mean": float(rewards[scored].mean()) if bool(scored.any()) else 0.0,
            "reward_std": float(rewards[scored].std()) if int(scored.sum()) > 1 else 0.0,
            "unscored": int((~scored).sum()),
            "accuracy": _mean(
                [float(v or 0.0) for v in correctness_reward(rollout.texts, **repeated)]
                if "answer_value" in repeated
                else []
            ),
            "format": _mean([v for v in parts["format_reward"] if v is not None]) if "format_reward" in parts else None,
            "kl": kl_sum / max(kl_tokens, 1.0) if g.beta else None,  # measured only when the loss uses it
            "clip_fraction": clipped / max(kept_tokens * g.updates_per_rollout, 1.0),
            "entropy": sum(rollout.entropy) / max(sum(lengths), 1),
            "completion_length": sum(lengths) / len(lengths),
            "truncated_fraction": sum(rollout.truncated) / len(rollout.truncated),
            "skipped_groups": int(flat.sum()) if g.skip_zero_variance else 0,
            "skipped_fraction": float(flat.float().mean()) if g.skip_zero_variance else 0.0,
            "updated": bool(rows),
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": lr,
            "latent_shift": shift,
            "groups": groups,
        }
        logger.info(
            "grpo step %d: reward %.3f±%.3f, accuracy %.3f, skipped %d/%d groups, KL %s, entropy %.3f, length %.1f",
            metrics["step"], metrics["reward_mean"], metrics["reward_std"], metrics["accuracy"] or 0.0,
            metrics["skipped_groups"], groups, "off" if metrics["kl"] is None else f"{metrics['kl']:.4g}",
            metrics["entropy"], metrics["completion_length"],
        )  # fmt: skip
        return metrics


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None
