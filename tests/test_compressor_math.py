"""The compressor model, the exact solver and the metrics, on hand-made data."""

from __future__ import annotations

import pytest
import torch

from llm_trm_core.compressor.moments import MomentAccumulator, solve
from llm_trm_core.errors import UserError
from llm_trm_core.metrics import LMHead, ReconstructionMetrics
from llm_trm_core.models.compressor import LinearCompressor, check_compatible


def _data(n: int = 4000, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 2.0


def _fit(x: torch.Tensor, k: int, centered: bool) -> LinearCompressor:
    m = MomentAccumulator(x.shape[1])
    m.update(x)
    basis = solve(m, centered)
    model = LinearCompressor(x.shape[1], k, centered=centered)
    model.set_weights(basis.weight(k), basis.offset())
    return model


@pytest.mark.parametrize("centered", [False, True])
def test_closed_form_error_equals_the_discarded_eigenvalues(centered: bool) -> None:
    x = _data().double().float()
    m = MomentAccumulator(x.shape[1])
    m.update(x)
    basis = solve(m, centered)
    for k in (1, 4, 12):
        model = _fit(x, k, centered)
        with torch.no_grad():
            per_token = float(((model(x).double() - x.double()) ** 2).sum(1).mean())
        assert per_token == pytest.approx(float(basis.eigenvalues[k:].sum()), rel=1e-4)


@pytest.mark.parametrize("centered", [False, True])
def test_closed_form_beats_sgd_and_random_projections(centered: bool) -> None:
    x = _data()
    with torch.no_grad():
        exact = float(((_fit(x, 6, centered)(x) - x) ** 2).mean())
    torch.manual_seed(0)
    for _ in range(5):  # random orthonormal projections
        random = LinearCompressor(x.shape[1], 6, centered=centered)
        if centered:
            random.set_weights(random.weight.detach(), x.mean(0))
        with torch.no_grad():
            assert float(((random(x) - x) ** 2).mean()) > exact
    model = LinearCompressor(x.shape[1], 6, centered=centered)  # gradient descent from a random init
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(600):
        opt.zero_grad()
        loss = ((model(x) - x) ** 2).mean()
        loss.backward()
        opt.step()
    final = loss.item()
    assert exact <= final * (1 + 1e-3)
    assert final < exact * 1.1  # and SGD gets close: both solve the same problem


def test_moments_merge_equals_one_pass_and_the_solve_is_deterministic() -> None:
    x = _data()
    whole, a, b = MomentAccumulator(24), MomentAccumulator(24), MomentAccumulator(24)
    whole.update(x)
    a.update(x[:1234])
    b.update(x[1234:])
    a.merge(b)
    assert a.count == whole.count
    torch.testing.assert_close(a.outer, whole.outer)
    first, second = solve(whole, True), solve(a, True)
    torch.testing.assert_close(first.components, second.components)
    assert torch.all(first.eigenvalues[:-1] >= first.eigenvalues[1:])


def test_compressor_bytes_round_trip_and_bad_shapes() -> None:
    model = _fit(_data(), 5, centered=True)
    weights, config = model.to_bytes()
    again = LinearCompressor.from_bytes(weights, config)
    x = _data(10)
    torch.testing.assert_close(again(x), model(x))
    assert again.config == {"hidden_size": 24, "d_prime": 5, "centered": True}
    with pytest.raises(UserError, match="must be between 1 and the model's hidden size D=24"):
        LinearCompressor(24, 24)
    with pytest.raises(UserError, match="another language model"):
        check_compatible(model, 32, "checkpoint")


def test_solve_needs_data() -> None:
    with pytest.raises(UserError, match="at least 2 tokens"):
        solve(MomentAccumulator(4), centered=False)


def test_metrics_perfect_reconstruction_and_mean_predictor() -> None:
    x = _data(500)
    head = LMHead(torch.randn(50, 24))
    perfect = ReconstructionMetrics(x.mean(0), head, 100)
    perfect.update(x, x.clone())
    m = perfect.compute()
    assert m["mse"] == 0 and m["fvu"] == 0 and m["r2"] == 1
    assert m["cosine"] == pytest.approx(1) and m["cosine_centered"] == pytest.approx(1)
    assert m["variance_ratio"] == pytest.approx(1) and m["lm_kl"] == pytest.approx(0, abs=1e-9)
    assert m["lm_top1"] == 1

    mean_only = ReconstructionMetrics(x.mean(0))
    mean_only.update(x, x.mean(0).expand_as(x))
    m = mean_only.compute()
    assert m["fvu"] == pytest.approx(1, rel=1e-6)  # the held-out mean explains no variance
    assert m["variance_ratio"] == pytest.approx(0, abs=1e-9)
    assert abs(m["cosine_centered"]) < 1e-6  # after centering, the constant carries no direction
    assert m["cosine"] > 0.3  # the raw cosine is inflated by the shared mean: why we report both


def test_metrics_hand_computed() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    metrics = ReconstructionMetrics(torch.zeros(2))
    metrics.update(x, x_hat)
    m = metrics.compute()
    assert m["mse"] == pytest.approx(1 / 4)
    assert m["rel_error"] == pytest.approx((1 / 5) ** 0.5)
    assert m["cosine"] == pytest.approx((2**-0.5 + 1) / 2)
    # held-out variance per dim: 0.25 and 1.0 -> Σ‖x − x̄‖² = 2 * 1.25 = 2.5
    assert m["fvu"] == pytest.approx(1 / 2.5)


def test_lm_head_kl_direction_and_logit_lens() -> None:
    torch.manual_seed(0)
    head = LMHead(torch.randn(30, 8))
    x, x_hat = torch.randn(40, 8), torch.randn(40, 8)
    metrics = ReconstructionMetrics(torch.zeros(8), head, 40)
    metrics.update(x, x_hat)
    p = torch.softmax(x @ head.weight.T, -1)
    q = torch.softmax(x_hat @ head.weight.T, -1)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())  # KL(p‖q), p from the original
    assert metrics.compute()["lm_kl"] == pytest.approx(expected, rel=1e-5)
    lens = LMHead(head.weight, torch.full((8,), 2.0), 1e-6)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * 2.0
    torch.testing.assert_close(lens.logits(x), normed @ head.weight.T)
