"""SequenceTRM: a Tiny Recursive Model over a sequence of compressed states, predicting one vector.

Faithful to the original (docs/original-llm-trm.md) by default:
- one shared network of `n_layers` pre-norm blocks (attention + GELU MLP with biases), no positions;
- a learned reasoning token appended after the context; the prediction is y at that position;
- latent recursion: n times z ← norm(net(x + y + z)), then y ← norm(net(y + z)) (shared output RMSNorm);
- deep recursion: T−1 latent recursions without gradients, then one with gradients;
- deep supervision: N_sup steps, y and z carried (detached) from step to step, y = z = 0 at the start;
- a halt head on the prediction.
Options from the official TRM: RoPE positions, post-norm blocks with parameter-free RMS norm, SwiGLU,
halt head initialised to zero weights and bias −5 (trained with BCE-with-logits).

Fix over the original: inputs and targets are standardized with training statistics (buffers saved
with the weights). The original's output RMSNorm produces unit-scale vectors while compressed LM
states have large norms, so its predictions carried a large norm error (docs/original-llm-trm.md).
`supervision_step` works in the standardized space; `predict_steps` returns raw-scale vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from llm_trm_core.errors import UserError


@dataclass
class Carry:
    """The recursion state carried between supervision steps: (B, L+1, D') each."""

    y: torch.Tensor
    z: torch.Tensor

    def detach(self) -> Carry:
        return Carry(self.y.detach(), self.z.detach())


@dataclass
class Prepared:
    x: torch.Tensor  # (B, L+1, D') context with the reasoning token appended
    key_mask: torch.Tensor  # (B, L+1) True where a key may be attended (real token or reasoning token)
    positions: torch.Tensor  # (B, L+1) position ids (the reasoning token sits right after the context)


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on (B, H, T, hd) with per-row positions (B, T)."""
    half = x.shape[-1] // 2
    freqs = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float().unsqueeze(-1) * freqs  # (B, T, half)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, bias: bool, dropout: float, rope: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.out = nn.Linear(d, d, bias=bias)
        self.dropout = dropout
        self.rope = rope

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotate(q, positions), rotate(k, positions)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, T): every query sees the real keys (non-causal)
        if self.training and self.dropout > 0:
            out = dropout_attention(q, k, v, mask, self.dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, t, d))


def dropout_keep(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A dropout multiplier: 0 with probability ≈ p, else 1 / P(keep). Drawn as 16-bit uniform integers (four
    per 64-bit draw), so P(keep) is (1 − p) rounded to a multiple of 2⁻¹⁶ and the scale is its exact
    inverse (the expectation stays 1); per-element Bernoulli or float draws cost 2-5x more on CPU."""
    levels = round((1.0 - p) * 65536)
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    keep = bits.view(torch.int16)[:n].view(shape).lt(levels - 32768)
    return keep.to(dtype).mul_(65536 / levels)


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(q kᵀ / √hd, masked keys at −∞), dropout p on the attention weights, times v: what
    `F.scaled_dot_product_attention(..., dropout_p=p)` computes, with a cheaper dropout draw (`dropout_keep`)
    and the mask as an additive bias. Every row keeps at least the reasoning token's key."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5).add_(bias)
    weights = scores.softmax(-1)
    with torch.no_grad():
        keep = dropout_keep(weights.shape, p, weights.dtype, weights.device)
    return (weights * keep) @ v


class MLP(nn.Module):
    def __init__(self, d: int, expansion: int, kind: str, bias: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            hidden = int(math.ceil(expansion * d * 2 / 3 / 8) * 8)
            self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
            self.down = nn.Linear(hidden, d, bias=False)
        else:
            self.up = nn.Linear(d, expansion * d, bias=bias)
            self.down = nn.Linear(expansion * d, d, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.gate_up(h).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(h)))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp: str, expansion: int, norm: str, rope: bool, dropout: float) -> None:
        super().__init__()
        self.post = norm == "post"
        bias = mlp == "gelu"  # the original's GELU blocks carry biases; the official SwiGLU ones do not
        self.attn = Attention(d, n_heads, bias, dropout, rope)
        self.mlp = MLP(d, expansion, mlp, bias)
        self.norm1 = nn.RMSNorm(d, elementwise_affine=not self.post)
        self.norm2 = nn.RMSNorm(d, elementwise_affine=not self.post)

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.post:  # official TRM: h = norm(h + attn(h)); h = norm(h + mlp(h))
            h = self.norm1(h + self.attn(h, key_mask, positions))
            return self.norm2(h + self.mlp(h))
        h = h + self.attn(self.norm1(h), key_mask, positions)
        return h + self.mlp(self.norm2(h))


class SequenceTRM(nn.Module, PyTorchModelHubMixin):
    in_mean: torch.Tensor
    in_std: torch.Tensor
    out_mean: torch.Tensor
    out_std: torch.Tensor

    def __init__(
        self,
        d: int,
        n_layers: int = 2,
        n_heads: int = 8,
        mlp: str = "gelu",
        expansion: int = 4,
        norm: str = "pre",
        positions: str = "none",
        output_norm: bool = True,
        dropout: float = 0.1,
        n_latent: int = 6,
        t_recursions: int = 3,
        halt_bias_init: float | None = -5.0,
        readout: str = "none",
    ) -> None:
        super().__init__()
        if d % n_heads:
            raise UserError(f"the TRM width D'={d} is not divisible by trm.n_heads={n_heads}; pick a divisor of {d}")
        if positions == "rope" and (d // n_heads) % 2:
            raise UserError(f"RoPE needs an even head size; D'={d} / trm.n_heads={n_heads} is odd")
        self.d, self.n_latent, self.t_recursions = d, n_latent, t_recursions
        self.blocks = nn.ModuleList(
            Block(d, n_heads, mlp, expansion, norm, positions == "rope", dropout) for _ in range(n_layers)
        )
        self.out_norm = nn.RMSNorm(d) if output_norm else nn.Identity()
        self.readout: nn.Module = nn.Identity()
        if readout == "linear":  # a learned map after the output norm, starting as the identity
            linear = nn.Linear(d, d)
            nn.init.eye_(linear.weight)
            nn.init.zeros_(linear.bias)
            self.readout = linear
        elif readout != "none":
            raise UserError(f"unknown trm.readout {readout!r}; use none or linear")
        self.reasoning_token = nn.Parameter(torch.randn(d) * 0.02)
        self.halt_head = nn.Linear(d, 1)
        if halt_bias_init is not None:
            nn.init.zeros_(self.halt_head.weight)
            nn.init.constant_(self.halt_head.bias, halt_bias_init)
        for name, value in (("in_mean", 0.0), ("in_std", 1.0), ("out_mean", 0.0), ("out_std", 1.0)):
            self.register_buffer(name, torch.full((d,), value))

    @torch.no_grad()
    def set_normalization(
        self, in_mean: torch.Tensor, in_std: torch.Tensor, out_mean: torch.Tensor, out_std: torch.Tensor
    ) -> None:
        for name, value in (("in_mean", in_mean), ("in_std", in_std), ("out_mean", out_mean), ("out_std", out_std)):
            getattr(self, name).copy_(
                value.to(torch.float32).clamp_min(1e-6) if "std" in name else value.to(torch.float32)
            )

    def standardize_target(self, post: torch.Tensor) -> torch.Tensor:
        return (post.float() - self.out_mean) / self.out_std

    def denormalize(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction.float() * self.out_std + self.out_mean

    def prepare(self, pre: torch.Tensor, mask: torch.Tensor) -> Prepared:
        """pre (B, L, D') raw compressed states with mask (B, L) -> standardized input + reasoning token."""
        pre = (pre.float() - self.in_mean) / self.in_std * mask.unsqueeze(-1)
        b, length, _ = pre.shape
        token = self.reasoning_token.to(pre.dtype).expand(b, 1, self.d)
        x = torch.cat([pre, token], dim=1)
        key_mask = torch.cat([mask.bool(), torch.ones(b, 1, dtype=torch.bool, device=pre.device)], dim=1)
        positions = torch.arange(length + 1, device=pre.device).expand(b, -1).clone()
        positions[:, -1] = mask.sum(1)  # the reasoning token sits right after each row's real context
        return Prepared(x, key_mask, positions)

    def initial_carry(self, prepared: Prepared) -> Carry:
        return Carry(torch.zeros_like(prepared.x), torch.zeros_like(prepared.x))

    def net(self, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, prepared.key_mask, prepared.positions)
        return h

    def latent_recursion(self, prepared: Prepared, carry: Carry) -> Carry:
        y, z = carry.y, carry.z
        for _ in range(self.n_latent):
            z = self.out_norm(self.net(prepared.x + y + z, prepared))
        y = self.out_norm(self.net(y + z, prepared))
        return Carry(y, z)

    def supervision_step(self, prepared: Prepared, carry: Carry) -> tuple[Carry, torch.Tensor, torch.Tensor]:
        """T−1 recursions without gradients, one with. Returns (carry, prediction (B, D'), halt logit (B,))."""
        with torch.no_grad():
            for _ in range(self.t_recursions - 1):
                carry = self.latent_recursion(prepared, carry)
        carry = self.latent_recursion(prepared, carry)
        prediction = self.readout(carry.y[:, -1])
        return carry, prediction, self.halt_head(prediction).squeeze(-1)

    @torch.no_grad()
    def predict_steps(
        self, pre: torch.Tensor, mask: torch.Tensor, n_steps: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(raw-scale prediction, halt logit) after each of `n_steps` supervision steps (all steps run)."""
        prepared = self.prepare(pre, mask)
        carry = self.initial_carry(prepared)
        out = []
        for _ in range(n_steps):
            carry, prediction, halt = self.supervision_step(prepared, carry)
            out.append((self.denormalize(prediction), halt))
        return out
