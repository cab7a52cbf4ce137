"""The generalized Gauss-Newton matrix G = J^T H_out J of a model's loss, as a ``scipy`` LinearOperator.

    G = eosflow.GaussNewtonOperator.from_model(apply_fn, params, inputs, targets, "cross_entropy")
    G = eosflow.GaussNewtonOperator(problem.objective, w)   # a built-in or from_model problem
    values, vectors = scipy.sparse.linalg.eigsh(G, k=3, which="LA")    # or spectral_density.stochastic_lanczos

For L(w) = ell(f(w), y) with f the outputs on the batch, J = df/dw and H_out = d^2 ell / df^2:

    H = J^T H_out J + sum_o (d ell / d f_o) d^2 f_o / dw^2 = G + (the functional Hessian).

G is positive semi-definite for a loss convex in the outputs (MSE, cross-entropy), and at the edge of
stability it carries the outliers of H (Cohen et al. 2021, appendix; Sagun et al. 2017): comparing the top
eigenvalues of G and H says whether the sharpness that meets 2/lr is the Gauss-Newton part's.
``G @ v`` is one linearization of the outputs, J v forward (or by transposing the pullback, for a model that
calls a ``jax.custom_vjp`` function), H_out (J v) reverse-over-reverse in the output space, and the pullback
J^T: about the cost of an HVP. Vectors are in the flattened parameter order of :func:`eosflow.objective.ravel`.
A problem evaluated in microbatches (``Problem.with_microbatch``) is multiplied chunk by chunk,
G = sum_c (n_c / n) G_c, one chunk's activations at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg
from jaxtyping import Array, Float

from eosflow import compiled
from eosflow.derivative_chain import ReverseModeLoss
from eosflow.objective import ModelLoss, Objective
from eosflow.precision import MATMUL_PRECISION

PyTree = Any


class GaussNewtonProduct(eqx.Module):
    """V -> G V = J^T H_out J V on one batch (columns of V: d x k), for ``loss(model(unravel(w), x), y)``."""

    model_loss: ModelLoss
    reverse_only: bool = eqx.field(static=True)  # J V by transposing the pullback (a custom_vjp model)

    def __call__(self, w: Float[Array, " d"], vectors: Float[Array, "d k"], batch: PyTree) -> Float[Array, "d k"]:
        inputs, targets = batch
        model, unravel, loss = self.model_loss.model, self.model_loss.unravel, self.model_loss.loss

        def outputs_of(w):
            return model(unravel(w), inputs)

        if self.reverse_only:
            outputs, pullback = jax.vjp(outputs_of, w)
            # J v = (d (J^T u) / du)^T v: the pullback is linear in u, so its own pullback is J
            push = jax.vjp(lambda u: pullback(u)[0], jax.tree_util.tree_map(jnp.zeros_like, outputs))[1]

            def forward(v):
                return push(v)[0]
        else:
            outputs, forward = jax.linearize(outputs_of, w)
            pullback = jax.linear_transpose(forward, w)
        loss_grad = jax.grad(lambda f: loss(f, targets))

        def product(v):
            jv = forward(v)
            h_jv = jax.grad(lambda f: _inner(loss_grad(f), jv))(outputs)  # H_out (J v), reverse-over-reverse
            return pullback(h_jv)[0]

        return jax.vmap(product, in_axes=1, out_axes=1)(vectors)


def _inner(a: PyTree, b: PyTree) -> Array:
    """sum of a . b over the leaves (outputs may be a pytree)."""
    return sum(
        (jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))), jnp.zeros(())
    )


class GaussNewtonOperator(scipy.sparse.linalg.LinearOperator):
    """G(w) of ``objective`` (d x d, symmetric, PSD for a convex loss); ``products`` counts the G-vector products.

    ``objective`` is a model's: ``Problem.from_model`` / ``from_equinox``'s, or a built-in problem's
    (``problem.objective``); a loss given as a bare function of w has no outputs to split, and is refused."""

    def __init__(self, objective: Objective, w: Array | np.ndarray):
        model_loss: Any = objective.loss_on
        reverse_only = isinstance(model_loss, ReverseModeLoss)
        if reverse_only:
            model_loss = model_loss.loss_on
        if not isinstance(model_loss, ModelLoss):
            raise TypeError(
                "the Gauss-Newton matrix J^T H_out J needs the model's outputs and the loss on them, and this "
                f"objective's loss is a function of w alone ({type(model_loss).__name__}): build the problem with "
                "Problem.from_model(apply_fn, params, inputs, targets, loss) or use GaussNewtonOperator.from_model"
            )
        self.product = GaussNewtonProduct(model_loss, reverse_only)
        self.data = objective.data
        self.microbatch = objective.microbatch
        self.w = jnp.asarray(w)
        self.products = 0
        super().__init__(dtype=np.dtype(self.w.dtype), shape=(self.w.size, self.w.size))

    @classmethod
    def from_model(
        cls,
        apply_fn: Callable[[PyTree, Array], Array],
        params: PyTree,
        inputs: Array,
        targets: Array,
        loss: str | Callable[[Array, Array], Array] = "mse",
        wrt: Any = None,
    ) -> GaussNewtonOperator:
        """G of ``loss(apply_fn(params, inputs), targets)`` at ``params``, checked and flattened as
        ``Problem.from_model`` does (same arguments: a built-in loss name or ``loss(outputs, targets)``
        averaging over examples; a Flax NNX or Equinox module's differentiable part, or the part ``wrt`` selects)."""
        from eosflow.problems import Problem

        problem = Problem.from_model(apply_fn, params, inputs, targets, loss, wrt=wrt)
        return cls(problem.objective, problem.w0)

    def _matmat(self, vectors: np.ndarray) -> np.ndarray:
        self.products += vectors.shape[1]
        columns = jnp.asarray(vectors, self.w.dtype)
        with jax.default_matmul_precision(MATMUL_PRECISION):  # full float32 products on a GPU (eosflow.precision)
            return np.asarray(
                sum(
                    share * compiled.gauss_newton_batch(self.product, self.w, columns, chunk)
                    for share, chunk in self._chunks()
                )
            )

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(v, (-1, 1)))[:, 0]

    def _chunks(self) -> list[tuple[float, PyTree]]:
        """(n_c / n, chunk c): the whole batch, or consecutive ``microbatch``-sized chunks of it."""
        n = int(jax.tree_util.tree_leaves(self.data)[0].shape[0])
        size = self.microbatch or n
        return [(min(size, n - start) / n, self._slice(start, size)) for start in range(0, n, size)]

    def _slice(self, start: int, size: int) -> PyTree:
        return jax.tree_util.tree_map(lambda leaf: leaf[start : start + size], self.data)

    def _adjoint(self) -> GaussNewtonOperator:
        return self  # symmetric
