"""Deep matrix factorization: L square factors whose product should equal a rank-r target.

    L(W_1, ..., W_L) = 1/2 ||W_L ... W_1 - M||_F^2          (reduction = "sum")
                     = 1/(2 d^2) ||W_L ... W_1 - M||_F^2    (reduction = "mean")

with every W_l a d x d matrix and M = sum_{j<r} s_j u_j v_j^T, (u_j), (v_j) random orthonormal
families oriented so that u_j . v_j >= 0, and s_j = target_scale * (r - j) / r (distinct
singular values target_scale, ..., target_scale / r). The flat parameters are (W_1, ..., W_L),
each row-major. depth = 2 is the shallow factorization W_2 W_1; dim = 1 is the scalar deep
product 1/2 (w_1 w_2 ... w_L - s)^2.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eosflow.config import SpecError, option
from eosflow.objective import Objective
from eosflow.problems.registry import Problem, register_problem


@dataclasses.dataclass(frozen=True)
class FactorizationParams:
    dim: int = option(2, "d: every factor is d x d (1: the scalar deep product)", ge=1)
    depth: int = option(3, "L: the number of factors (2: shallow W2 W1)", ge=1)
    rank: int = option(1, "r: the rank of the target matrix M", ge=1)
    target_scale: float = option(1.0, "s: M's singular values are s, s(r-1)/r, ..., s/r", gt=0)
    init: Literal["gaussian", "identity"] = option(
        "gaussian", "gaussian: W_l = init_scale * G_l / sqrt(d), G_l standard normal; identity: W_l = init_scale * I"
    )
    init_scale: float = option(0.5, "scale of every initial factor", gt=0)
    reduction: Literal["sum", "mean"] = option("sum", "sum: 1/2 ||P - M||_F^2; mean: divided by d^2")

    def check(self, where: str) -> None:
        if self.rank > self.dim:
            raise SpecError(f"`{where}.rank` = {self.rank} exceeds `{where}.dim` = {self.dim}")


def target_matrix(dim: int, rank: int, scale: float, seed: int) -> np.ndarray:
    """M = U diag(s) V^T with random orthonormal U, V (d x r), columns paired so that u_j . v_j >= 0."""
    rng = np.random.default_rng([seed, 7])
    left = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    right = right * np.where(np.sum(left * right, axis=0) < 0, -1.0, 1.0)
    singular_values = scale * (rank - np.arange(rank)) / rank
    return (left * singular_values) @ right.T


class DeepFactorization(eqx.Module):
    """w = (W_1, ..., W_L) flattened -> weight * ||W_L ... W_1 - M||_F^2 / 2."""

    target: jax.Array
    depth: int = eqx.field(static=True)
    weight: float = eqx.field(static=True)

    def product(self, w: jax.Array) -> jax.Array:
        d = self.target.shape[0]
        factors = w.reshape(self.depth, d, d)
        return functools.reduce(lambda p, factor: factor @ p, [factors[i] for i in range(self.depth)])

    def __call__(self, w: jax.Array) -> jax.Array:
        return 0.5 * self.weight * jnp.sum((self.product(w) - self.target) ** 2)


@register_problem(
    "matrix_factorization",
    FactorizationParams,
    "1/2 ||W_L ... W_1 - M||_F^2 with d x d factors and a rank-r target (dim = 1: scalar deep product)",
)
def matrix_factorization(params: FactorizationParams, seed: int, dtype) -> Problem:
    d, depth = params.dim, params.depth
    target = target_matrix(d, params.rank, params.target_scale, seed)
    weight = 1.0 if params.reduction == "sum" else 1.0 / d**2
    objective = Objective.from_function(DeepFactorization(jnp.asarray(target, dtype), depth, weight))
    if params.init == "identity":
        factors = np.broadcast_to(np.eye(d), (depth, d, d))
    else:
        factors = np.random.default_rng([seed, 8]).standard_normal((depth, d, d)) / np.sqrt(d)
    w0 = jnp.asarray(params.init_scale * factors.reshape(-1), dtype)
    info = {"dimension": depth * d * d, "layout": "w = (W_1, ..., W_L), each d x d row-major; P = W_L ... W_1"}
    return Problem(objective, w0, info=info)
