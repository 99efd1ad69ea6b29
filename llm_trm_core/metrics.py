"""Reconstruction metrics of predicted hidden states (compressor, TRM), accumulated over batches.

For targets x and reconstructions x̂ (N tokens × D), with μ the *training* mean:
- mse            Σ(x̂−x)² / (N·D)
- rel_error      ‖X̂−X‖_F / ‖X‖_F
- cosine         mean_t cos(x_t, x̂_t)
- cosine_centered mean_t cos(x_t−μ, x̂_t−μ)   (not inflated by the shared mean direction)
- variance_ratio mean_d Var(x̂_d) / Var(x_d)
- fvu            Σ‖x̂−x‖² / Σ‖x−x̄‖²            (fraction of variance unexplained; x̄ = held-out mean)
- r2             1 − fvu
- lm_kl / lm_top1  KL(softmax(head(x)) ‖ softmax(head(x̂))) and argmax agreement, on the first
                   `lm_head_tokens` tokens (head = the LM's output head, after its final norm when
                   the states come from an inner layer: a logit lens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-12


@dataclass
class LMHead:
    """The LM's output projection (and final norm, for inner layers) as plain tensors."""

    weight: torch.Tensor  # (V, D)
    norm_weight: torch.Tensor | None = None  # (D,) RMSNorm gain, applied before the head when set
    norm_eps: float = 1e-5

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.norm_weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight
        return x @ self.weight.T


class ReconstructionMetrics:
    def __init__(
        self,
        train_mean: torch.Tensor,
        lm_head: LMHead | None = None,
        lm_head_tokens: int = 2048,
        r2_against_train_mean: bool = False,
    ) -> None:
        d = train_mean.shape[0]
        self.r2_against_train_mean = r2_against_train_mean
        self.mu = train_mean.to(torch.float64)
        self.lm_head = lm_head
        self.lm_head_tokens = lm_head_tokens
        self.n = 0
        self.sq_err = 0.0
        self.sq_norm = 0.0
        self.cos_sum = 0.0
        self.cos_centered_sum = 0.0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_x2 = torch.zeros(d, dtype=torch.float64)
        self.sum_xh = torch.zeros(d, dtype=torch.float64)
        self.sum_xh2 = torch.zeros(d, dtype=torch.float64)
        self.lm_n = 0
        self.kl_sum = 0.0
        self.top1_sum = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64, h64 = x.detach().to("cpu", torch.float64), x_hat.detach().to("cpu", torch.float64)
        if not (torch.isfinite(h64).all() and torch.isfinite(x64).all()):
            raise ValueError("non-finite values in hidden states or their reconstruction")
        diff = h64 - x64
        self.n += x64.shape[0]
        self.sq_err += float(diff.pow(2).sum())
        self.sq_norm += float(x64.pow(2).sum())
        self.cos_sum += float(F.cosine_similarity(x64, h64, dim=-1, eps=EPS).sum())
        self.cos_centered_sum += float(F.cosine_similarity(x64 - self.mu, h64 - self.mu, dim=-1, eps=EPS).sum())
        self.sum_x += x64.sum(0)
        self.sum_x2 += x64.pow(2).sum(0)
        self.sum_xh += h64.sum(0)
        self.sum_xh2 += h64.pow(2).sum(0)
        if self.lm_head is not None and self.lm_n < self.lm_head_tokens:
            take = min(self.lm_head_tokens - self.lm_n, x.shape[0])
            self._update_lm(x[:take], x_hat[:take])

    def _update_lm(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        assert self.lm_head is not None
        for start in range(0, x.shape[0], 256):  # bound the (tokens × vocab) logits in memory
            p_log = F.log_softmax(self.lm_head.logits(x[start : start + 256]).float(), dim=-1)
            q_log = F.log_softmax(self.lm_head.logits(x_hat[start : start + 256]).float(), dim=-1)
            self.kl_sum += float(F.kl_div(q_log, p_log, log_target=True, reduction="sum"))
            self.top1_sum += float((p_log.argmax(-1) == q_log.argmax(-1)).sum())
            self.lm_n += p_log.shape[0]

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no held-out tokens were evaluated")
        n, d = self.n, self.mu.shape[0]
        var_x = self.sum_x2 / n - (self.sum_x / n) ** 2
        var_xh = self.sum_xh2 / n - (self.sum_xh / n) ** 2
        total_var = float(var_x.sum()) * n  # Σ‖x − x̄‖²
        fvu = self.sq_err / max(total_var, EPS)
        out = {
            "mse": self.sq_err / (n * d),
            "rel_error": (self.sq_err / max(self.sq_norm, EPS)) ** 0.5,
            "cosine": self.cos_sum / n,
            "cosine_centered": self.cos_centered_sum / n,
            "variance_ratio": float((var_xh / var_x.clamp_min(EPS)).mean()),
            "fvu": fvu,
            "r2": 1.0 - fvu,
            "tokens": float(n),
        }
        if self.r2_against_train_mean:  # 1 - Σ‖x̂−x‖² / Σ‖x−μ_train‖²: the training-mean predictor scores exactly 0
            around_mu = self.sq_norm - 2 * float(self.mu @ self.sum_x) + n * float(self.mu @ self.mu)
            out["r2_train_mean"] = 1.0 - self.sq_err / max(around_mu, EPS)
        if self.lm_n:
            out["lm_kl"] = self.kl_sum / self.lm_n
            out["lm_top1"] = self.top1_sum / self.lm_n
        return out
