"""Tied, bias-free linear compressor D -> D' (the original's model), with an optional mean.

    c = compress(x) = (x − μ) Wᵀ          W ∈ R^{D'×D}, orthonormal rows at init
    x̂ = decompress(c) = c W + μ           μ = 0 unless centered

Saved as safetensors + config.json through `PyTorchModelHubMixin`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from llm_trm_core.errors import UserError


class LinearCompressor(nn.Module, PyTorchModelHubMixin):
    def __init__(self, hidden_size: int, d_prime: int, centered: bool = False) -> None:
        super().__init__()
        if not 0 < d_prime < hidden_size:
            raise UserError(
                f"compressor.d_prime={d_prime} must be between 1 and the model's hidden size D={hidden_size} "
                "(exclusive): a D'≥D 'compressor' compresses nothing"
            )
        self.hidden_size = hidden_size
        self.d_prime = d_prime
        self.centered = centered
        self.weight = nn.Parameter(torch.empty(d_prime, hidden_size))
        nn.init.orthogonal_(self.weight)
        self.mean = nn.Parameter(torch.zeros(hidden_size), requires_grad=centered)

    @property
    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "d_prime": self.d_prime, "centered": self.centered}

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D')"""
        w = self.weight
        return (x.to(w.dtype) - self.mean) @ w.T

    def decompress(self, c: torch.Tensor) -> torch.Tensor:
        """(..., D') -> (..., D)"""
        w = self.weight
        return c.to(w.dtype) @ w + self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decompress(self.compress(x))

    @torch.no_grad()
    def set_weights(self, weight: torch.Tensor, mean: torch.Tensor | None = None) -> None:
        self.weight.copy_(weight.to(self.weight.dtype))
        self.mean.copy_(mean.to(self.mean.dtype) if mean is not None else torch.zeros_like(self.mean))

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(model.safetensors, config.json) contents."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(tensors), json.dumps(self.config, indent=2).encode()

    @classmethod
    def from_bytes(cls, weights: bytes, config: bytes) -> LinearCompressor:
        model = cls(**json.loads(config))
        model.load_state_dict(load_safetensors(weights))
        return model.eval()


def check_compatible(compressor: LinearCompressor, hidden_size: int, what: str) -> None:
    """Clear error when a compressor built for another model's hidden size is used."""
    if compressor.hidden_size != hidden_size:
        raise UserError(
            f"{what} was built for hidden size D={compressor.hidden_size}, but the model's hidden states have "
            f"D={hidden_size}: it belongs to another language model. Use a compressor trained on this model."
        )
