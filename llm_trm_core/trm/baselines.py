"""Simple predictors of the post vector from the pre sequence, fitted on train, tuned on val.

- mean: the training mean of the targets (a constant);
- last_pre: the last pre state (the state that predicts the thinking span's start);
- mean_pool: the mean of the pre states;
- ridge: ridge regression from [mean-pooled pre, last pre] to the target, λ chosen on val;
- knn: mean target of the k training samples most similar (cosine of centered mean-pooled pre), k chosen on val.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from llm_trm_core.datagen.generate import PairStates


@dataclass
class Features:
    mean_pool: torch.Tensor  # (N, D')
    last: torch.Tensor  # (N, D')
    target: torch.Tensor  # (N, D')

    @classmethod
    def of(cls, pairs: Iterable[PairStates]) -> Features:
        means, lasts, targets = [], [], []
        for p in pairs:
            pre = p.pre if p.pre.shape[0] else p.post.new_zeros(1, p.post.shape[0])
            means.append(pre.mean(0))
            lasts.append(pre[-1])
            targets.append(p.post)
        return cls(torch.stack(means).double(), torch.stack(lasts).double(), torch.stack(targets).double())

    def design(self) -> torch.Tensor:
        return torch.cat([self.mean_pool, self.last], dim=1)


Predictor = Callable[[Features], torch.Tensor]


def _mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target) ** 2).mean())


def fit_ridge(train: Features, lam: float) -> Predictor:
    x = train.design()
    mu_x, mu_y = x.mean(0), train.target.mean(0)
    xc, yc = x - mu_x, train.target - mu_y
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(xc.T @ xc + lam * x.shape[0] * eye, xc.T @ yc)
    return lambda f: (f.design() - mu_x) @ weights + mu_y


def fit_knn(train: Features, k: int) -> Predictor:
    center = train.mean_pool.mean(0)
    keys = torch.nn.functional.normalize(train.mean_pool - center, dim=1)

    def predict(f: Features) -> torch.Tensor:
        queries = torch.nn.functional.normalize(f.mean_pool - center, dim=1)
        top = (queries @ keys.T).topk(min(k, keys.shape[0]), dim=1).indices
        return train.target[top].mean(1)

    return predict


def fit_baselines(
    train: Features, val: Features, lambdas: list[float], ks: list[int]
) -> tuple[dict[str, Predictor], dict[str, float]]:
    """All baselines, with ridge λ and kNN k picked by validation MSE. Returns (predictors, chosen values)."""
    mean = train.target.mean(0)
    predictors: dict[str, Predictor] = {
        "mean": lambda f: mean.expand_as(f.target),
        "last_pre": lambda f: f.last,
        "mean_pool": lambda f: f.mean_pool,
    }
    ridge = {lam: fit_ridge(train, lam) for lam in lambdas}
    best_lam = min(lambdas, key=lambda lam: _mse(ridge[lam](val), val.target))
    knn = {k: fit_knn(train, k) for k in ks}
    best_k = min(ks, key=lambda k: _mse(knn[k](val), val.target))
    predictors["ridge"] = ridge[best_lam]
    predictors["knn"] = knn[best_k]
    return predictors, {"ridge_lambda": best_lam, "knn_k": float(best_k)}
