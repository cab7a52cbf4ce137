"""Linear regression with label noise: the exactly solvable model of SGD's limiting dynamics.

    x_i ~ N(0, diag(lambda)) rotated by a random orthonormal basis,   y_i = x_i^T w* + sigma eps_i,
    L(w) = 1/(2n) sum_i (x_i^T w - y_i)^2,   H = X^T X / n,   g_i = x_i (x_i^T w - y_i)

with a power-law input spectrum lambda_j = scale * j^(-decay). Near the minimizer the per-example
gradient covariance is Sigma_g ~ sigma_r^2 H, sigma_r^2 the mean squared residual
(see eosflow.theory.linear_regression).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from eosflow.config import option
from eosflow.objective import Objective
from eosflow.problems.registry import Problem, register_problem


@dataclasses.dataclass(frozen=True)
class LinearRegressionParams:
    dim: int = option(20, "number of features d", ge=1)
    n_train: int = option(500, "training examples n", ge=1)
    n_test: int = option(0, "held-out examples (0: none)", ge=0)
    noise: float = option(0.5, "label noise sigma: y = x^T w* + sigma eps", ge=0)
    scale: float = option(1.0, "largest input variance lambda_1", gt=0)
    decay: float = option(0.0, "input spectrum lambda_j = scale * j^(-decay) (0: isotropic)", ge=0)
    rotate: bool = option(True, "random orthonormal feature basis (else the coordinate axes)")
    init_scale: float = option(1.0, "norm of the random initial w0 (0: start at the origin)", ge=0)


def input_spectrum(params: LinearRegressionParams) -> np.ndarray:
    """lambda_j = scale * j^(-decay), j = 1..d: the population input covariance's eigenvalues."""
    return params.scale * np.arange(1, params.dim + 1, dtype=np.float64) ** (-params.decay)


def _linear(w, inputs):
    return inputs @ w


@register_problem(
    "linear_regression",
    LinearRegressionParams,
    "least squares on Gaussian inputs with label noise (power-law input spectrum)",
)
def linear_regression(params: LinearRegressionParams, seed: int, dtype) -> Problem:
    rng = np.random.default_rng(seed)
    d = params.dim
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0] if params.rotate else np.eye(d)
    root = basis * np.sqrt(input_spectrum(params))  # x = basis diag(sqrt lambda) z
    teacher = rng.standard_normal(d) / np.sqrt(d)

    def sample(n):
        inputs = rng.standard_normal((n, d)) @ root.T
        return inputs, inputs @ teacher + params.noise * rng.standard_normal(n)

    train, test = sample(params.n_train), sample(params.n_test)
    as_arrays = lambda pair: tuple(jnp.asarray(a, dtype) for a in pair)  # noqa: E731
    inputs, targets = as_arrays(train)
    objective, _ = Objective.from_model(_linear, jnp.zeros(d, dtype), inputs, targets, loss="mse")
    test_objective = objective.with_data(as_arrays(test)) if params.n_test else None
    w0 = rng.standard_normal(d)
    w0 = params.init_scale * w0 / np.linalg.norm(w0)
    info = {"dimension": d, "n_train": params.n_train, "n_test": params.n_test, "label_noise": params.noise}
    return Problem(objective, jnp.asarray(w0, dtype), test_objective, info=info)
