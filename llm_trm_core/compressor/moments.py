"""Exact solution of the tied linear autoencoder from one streaming pass.

min_W E‖x − μ − WᵀW(x − μ)‖² over W ∈ R^{D'×D} is solved by the top-D' eigenvectors of the second
moment E[(x−μ)(x−μ)ᵀ] (Eckart–Young): μ = 0 reproduces the original's uncentered model, μ = E[x]
gives the centered variant (PCA). Accumulators are float64 and add up across shards, processes and
machines (`merge`, `all_reduce`), so one pass over the data serves every D' (take the top-k rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm_trm_core.errors import UserError


class MomentAccumulator:
    """count, Σx and Σxxᵀ in float64."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.count = 0
        self.sum = torch.zeros(hidden_size, dtype=torch.float64)
        self.outer = torch.zeros(hidden_size, hidden_size, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """x: (N, D) rows of real tokens (no padding)."""
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"expected (N, {self.hidden_size}) rows, got {tuple(x.shape)}")
        x64 = x.detach().to("cpu", torch.float64)
        self.count += x64.shape[0]
        self.sum += x64.sum(0)
        self.outer += x64.T @ x64

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def all_reduce(self) -> None:
        """Sum the accumulators of every process of a torch.distributed group."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        for t in (count, self.sum, self.outer):
            dist.all_reduce(t)
        self.count = int(count.item())

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@dataclass(frozen=True)
class Basis:
    """Eigen-decomposition of the (centered or uncentered) second moment, components sorted by eigenvalue."""

    components: torch.Tensor  # (D, D) float64, row i = i-th eigenvector
    eigenvalues: torch.Tensor  # (D,) float64, descending
    mean: torch.Tensor  # (D,) float64: the data mean (used as μ when centered)
    count: int
    centered: bool

    def weight(self, d_prime: int) -> torch.Tensor:
        """The optimal W (D'×D, float32) for any D' < D: the top-D' eigenvectors."""
        return self.components[:d_prime].to(torch.float32)

    def offset(self) -> torch.Tensor | None:
        return self.mean.to(torch.float32) if self.centered else None

    def explained(self, d_prime: int) -> float:
        """Share of the (second-moment) energy kept by the top D' components."""
        total = float(self.eigenvalues.clamp_min(0).sum())
        return float(self.eigenvalues[:d_prime].clamp_min(0).sum()) / total if total > 0 else 0.0


def solve(moments: MomentAccumulator, centered: bool) -> Basis:
    if moments.count < 2:
        raise UserError(f"the closed-form solve needs hidden states of at least 2 tokens, got {moments.count}")
    n = moments.count
    mean = moments.mean()
    second = moments.outer / n
    if centered:
        second = second - torch.outer(mean, mean)
    second = (second + second.T) / 2  # exact symmetry for eigh
    eigenvalues, vectors = torch.linalg.eigh(second)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    components = vectors[:, order].T.contiguous()
    # Fix each component's sign (eigh's is arbitrary) so the solution is reproducible across machines.
    signs = torch.sign(components[torch.arange(components.shape[0]), components.abs().argmax(dim=1)])
    components = components * signs.unsqueeze(1)
    return Basis(components, eigenvalues[order], mean, n, centered)
