"""In-context linear regression.

Paper: Garg, Tsipras, Liang, Valiant, "What Can Transformers Learn In-Context? A Case Study of
Simple Function Classes", 2022, arXiv:2208.01066 (the linear-regression function class; also
the setting of "In-Context Linear Regression Demystified", literature.md row "In-context linear
regression with multi-head softmax attention").

Generative process, independently per sequence (``d = dim``, ``n = num_points``):

* ``w ~ N(0, I_d)``; ``x_i ~ N(0, I_d)`` i.i.d. for ``i = 1..n``;
* ``y_i = w . x_i + noise_std * eps_i`` with ``eps_i ~ N(0, 1)`` (Garg et al.: ``noise_std = 0``).

Layout (kind ``"regress"``, ``T = 2n``, ``input_dim = d + 1``, ``output_dim = 1``): position
``2i`` holds the x-token ``[x_i, 0]`` and position ``2i+1`` the y-token ``[0, ..., 0, y_i]``.
``targets[:, 2i, 0] = y_i`` (predict ``y_i`` having read ``x_i`` and the ``i`` previous pairs),
``weights`` are 1 at x-token positions and 0 at y-token positions (whose targets are 0).
Scored: squared error at every x-token, reported per number of in-context examples ``i``.
Garg et al. plot the squared error divided by ``d``; :func:`ridge_baseline` returns the
undivided per-example MSE.

:func:`ridge_baseline` is the reference the paper compares to: for each ``i`` it fits ridge
regression (``lam > 0``) or minimum-norm least squares (``lam = 0``) on the first ``i`` pairs
and predicts ``y_i`` (``0`` for ``i = 0``).  With the prior ``w ~ N(0, I)`` the Bayes-optimal
predictor is ridge with ``lam = noise_std**2`` (min-norm least squares when ``noise_std = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.tasks import base

__all__ = ["ICLRegression", "ridge_baseline", "split_batch"]


@dataclass(frozen=True)
class ICLRegression:
    dim: int = 5
    num_points: int = 20
    noise_std: float = 0.0
    seed: int = 0
    name: str = field(default="icl_regression", init=False)
    kind: str = field(default="regress", init=False)

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {self.dim!r}")
        if not isinstance(self.num_points, int) or self.num_points < 1:
            raise ValueError(f"num_points: expected an int >= 1, got {self.num_points!r}")
        if not isinstance(self.noise_std, (int, float)) or not self.noise_std >= 0.0:
            raise ValueError(f"noise_std: expected a float >= 0, got {self.noise_std!r}")

    @property
    def seq_len(self) -> int:
        return 2 * self.num_points

    @property
    def input_dim(self) -> int:
        return self.dim + 1

    @property
    def output_dim(self) -> int:
        return 1

    def sample(self, split: str, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The raw draw ``(w [B, d], x [B, n, d], y [B, n])`` behind ``batch(split, index, B)``."""
        rng = base.rng_for(self.seed, split, index)
        B, n, d = batch_size, self.num_points, self.dim
        w = rng.standard_normal((B, d))
        x = rng.standard_normal((B, n, d))
        eps = rng.standard_normal((B, n))
        y = np.einsum("bnd,bd->bn", x, w) + self.noise_std * eps
        return w, x, y

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        _, x, y = self.sample(split, index, batch_size)
        B, n, d = x.shape
        inputs = np.zeros((B, 2 * n, d + 1), dtype=np.float32)
        inputs[:, 0::2, :d] = x
        inputs[:, 1::2, d] = y
        targets = np.zeros((B, 2 * n, 1), dtype=np.float32)
        targets[:, 0::2, 0] = y
        weights = np.zeros((B, 2 * n), dtype=np.float32)
        weights[:, 0::2] = 1.0
        return {"inputs": inputs, "targets": targets, "weights": weights}


def split_batch(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Recover ``x [B, n, d]`` and ``y [B, n]`` from an ``ICLRegression`` batch."""
    inputs = np.asarray(batch["inputs"], dtype=np.float64)
    d = inputs.shape[-1] - 1
    return inputs[:, 0::2, :d], inputs[:, 1::2, d]


def ridge_baseline(batch: dict[str, np.ndarray], lam: float = 0.0) -> np.ndarray:
    """Per-example MSE ``[n]`` of ridge (``lam > 0``) / min-norm least squares (``lam = 0``).

    Entry ``i`` is the batch mean of ``(y_i - x_i . w_hat_i)**2`` where ``w_hat_i`` is fitted on
    the first ``i`` pairs of the same sequence (``w_hat_0 = 0``).
    """
    if not lam >= 0.0:
        raise ValueError(f"lam: expected a float >= 0, got {lam!r}")
    x, y = split_batch(batch)
    B, n, d = x.shape
    mse = np.empty(n)
    mse[0] = np.mean(y[:, 0] ** 2)
    for i in range(1, n):
        X, Y = x[:, :i], y[:, :i]
        if lam > 0:
            gram = np.einsum("bid,bie->bde", X, X) + lam * np.eye(d)
            w_hat = np.linalg.solve(gram, np.einsum("bid,bi->bd", X, Y)[..., None])[..., 0]
        else:
            w_hat = np.einsum("bdi,bi->bd", np.linalg.pinv(X), Y)
        pred = np.einsum("bd,bd->b", x[:, i], w_hat)
        mse[i] = np.mean((y[:, i] - pred) ** 2)
    return mse


base.register("icl_regression", ICLRegression)
