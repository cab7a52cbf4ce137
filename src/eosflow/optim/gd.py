"""Gradient descent, w_{k+1} = w_k - eta g(w_k), with the top Hessian eigenpairs tracked.

Each step also records ``edge_ratio`` = eta S / 2 (1 at the edge of stability, as for every
optimizer in :mod:`eosflow.optim.adaptive`; P = I, so ``preconditioned_sharpness`` is S) and GD's
oscillation read off GD alone: for w_k = c_k + (-1)^k delta_k with a linearly drifting centre,
|w_{k+1} - 2 w_k + w_{k-1}| / 4 = (eta / 4) |g_k - g_{k-1}| = |delta_k|.
When it bounces (<g_k, g_{k-1}> < 0) the eigensolver is warm-started from the vectors of step
k - 2, on the same side of the orbit (:func:`eosflow.spectrum.bouncing_warm_start`); the
measurement never feeds back into the iterates.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array

from eosflow.objective import Objective
from eosflow.process import ScannedProcess, register_process, scanned_fields
from eosflow.spectrum import bouncing_warm_start, spectrum_row


class GDState(NamedTuple):
    w: Array
    vectors: Array  # d x k: eigenvectors measured at the previous step
    older: Array  # d x k: those of the step before (the warm start when GD bounces)
    grad: Array  # the previous step's gradient (for ``oscillation``)
    step: Array


@dataclasses.dataclass(frozen=True)
class GDOptions:
    """Gradient descent has no options beyond the spec's ``lr`` and ``[spectrum]``."""


class GradientDescent(ScannedProcess):
    objective: Objective

    def init(self, w0: Array) -> GDState:
        vectors = self.initial_vectors(w0)
        return GDState(w0, vectors, vectors, jnp.zeros_like(w0), jnp.asarray(0))

    def step(self, state: GDState) -> tuple[GDState, dict[str, Array]]:
        loss, grad = self.objective.value_and_grad(state.w)
        start = state.vectors
        if self.spectrum.every == 1:  # the vectors of step k - 2 were measured on the same side
            start = bouncing_warm_start(state.vectors, state.older, grad, state.grad)
        vectors, row = spectrum_row(self.objective, state.w, start, state.step, self.lr, self.spectrum)
        oscillation = 0.25 * self.lr * jnp.linalg.norm(grad - state.grad)
        row.update(
            loss=loss,
            grad_norm=jnp.linalg.norm(grad),
            position=state.w,
            grads=jnp.asarray(1, jnp.int32),
            oscillation=jnp.where(state.step > 0, oscillation, jnp.nan),
            preconditioned_sharpness=row["sharpness"],
            edge_ratio=0.5 * row["lr_sharpness"],
        )
        new_w = state.w - self.lr * grad
        return GDState(new_w, vectors, state.vectors, grad, state.step + 1), row

    def _grow(self, state: GDState, rows: dict[str, Array]) -> GDState:
        """The new direction joins both sets of carried vectors."""
        grown = super()._grow(state, rows)
        k = state.older.shape[1]
        if grown.vectors.shape[1] == k:
            return grown
        return grown._replace(older=jnp.concatenate([state.older, grown.vectors[:, k:]], axis=1))


@register_process("gd", GDOptions, "gradient descent w <- w - lr * g(w)", discrete=True)
def build_gd(problem, spec, options) -> GradientDescent:
    return GradientDescent(**scanned_fields("gd", spec, problem.objective))
