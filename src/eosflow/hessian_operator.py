"""The Hessian at w as a ``scipy.sparse.linalg.LinearOperator`` that counts its HVPs.

    H = eosflow.HessianOperator.from_function(loss_fn, params)      # or HessianOperator(objective, w)
    values, vectors = scipy.sparse.linalg.eigsh(H, k=3, which="LA")
    H.hvps                                                            # Hessian-vector products spent

``H @ v`` is forward-over-reverse differentiation of the gradient (about two gradients' cost);
``H @ V`` for a block of k columns is one linearization of the gradient and k vectorized
products (k HVPs). Vectors are in the flattened parameter order of :func:`eosflow.objective.ravel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg
from jaxtyping import Array

from eosflow import compiled
from eosflow.objective import (
    Objective,
    ObjectiveProtocol,
    check_loss_call,
    differentiable_loss,
    differentiable_part,
    ravel,
)
from eosflow.precision import MATMUL_PRECISION
from eosflow.tracing import equations

PyTree = Any


class HessianOperator(scipy.sparse.linalg.LinearOperator):
    """H(w) of ``objective`` (d x d, symmetric); ``hvps`` counts the products computed."""

    def __init__(self, objective: ObjectiveProtocol, w: Array):
        self.objective = objective
        self.w = jnp.asarray(w)
        self.hvps = 0
        super().__init__(dtype=np.dtype(self.w.dtype), shape=(self.w.size, self.w.size))

    @classmethod
    def from_function(
        cls, loss_fn: Callable[..., Array], params: PyTree, batch: PyTree = None, wrt: Any = None
    ) -> HessianOperator:
        """H of ``loss_fn(params)`` (or ``loss_fn(params, batch)``) at ``params``: a pytree or vector, or an
        Equinox or Flax NNX module (H over its floating arrays or its Params, or the part ``wrt`` selects,
        :func:`eosflow.objective.differentiable_part`)."""
        check_loss_call(loss_fn, batch, "HessianOperator.from_function")
        arrays, rebuild = differentiable_part(params, wrt)
        flat, unravel = ravel(arrays)

        def loss(w):
            at = rebuild(unravel(w))
            return loss_fn(at) if batch is None else loss_fn(at, batch)

        objective = Objective.from_function(loss)
        loss_on = differentiable_loss(objective.loss_on, equations(objective.loss_on, flat, None), "loss_fn")
        return cls(eqx.tree_at(lambda o: o.loss_on, objective, loss_on), flat)

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        self.hvps += 1
        with jax.default_matmul_precision(MATMUL_PRECISION):  # full float32 products on a GPU (eosflow.precision)
            return np.asarray(compiled.hvp(self.objective, self.w, jnp.asarray(np.ravel(v), self.w.dtype)))

    def _matmat(self, vectors: np.ndarray) -> np.ndarray:
        if not hasattr(self.objective, "hvp_batch"):  # a bare ObjectiveProtocol: one product per column
            return np.stack([self._matvec(column) for column in vectors.T], axis=1)
        self.hvps += vectors.shape[1]
        with jax.default_matmul_precision(MATMUL_PRECISION):
            return np.asarray(compiled.hvp_batch(self.objective, self.w, jnp.asarray(vectors, self.w.dtype)))

    def _adjoint(self) -> HessianOperator:
        return self  # symmetric
