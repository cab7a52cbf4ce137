"""Gradient descent, w_{k+1} = w_k - eta g(w_k), with the top Hessian eigenpairs tracked.

Each step also records ``edge_ratio`` = eta S / 2 (1 at the edge of stability, as for every
optimizer in :mod:`eosflow.optim.adaptive`; P = I, so ``preconditioned_sharpness`` is S) and GD's
oscillation read off GD alone: for w_k = c_k + (-1)^k delta_k with a linearly drifting centre, |w_{k+1} - 2 w_k + w_{k-1}| / 4 = (eta / 4) |g_k - g_{k-1}| = |delta_k|.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array

from eosflow.objective import Objective
from eosflow.process import ScannedProcess, process_key, register_process
from eosflow.spectrum import spectrum_row


class GDState(NamedTuple):
    w: Array
    vectors: Array
    grad: Array  # the previous step's gradient (for ``oscillation``)
    step: Array


@dataclasses.dataclass(frozen=True)
class GDOptions:
    """Gradient descent has no options beyond the spec's ``lr`` and ``[spectrum]``."""


class GradientDescent(ScannedProcess):
    objective: Objective

    def init(self, w0: Array) -> GDState:
        return GDState(w0, self.initial_vectors(w0), jnp.zeros_like(w0), jnp.asarray(0))

    def step(self, state: GDState) -> tuple[GDState, dict[str, Array]]:
        loss, grad = self.objective.value_and_grad(state.w)
        vectors, row = spectrum_row(self.objective, state.w, state.vectors, state.step, self.lr, self.spectrum)
        oscillation = 0.25 * self.lr * jnp.linalg.norm(grad - state.grad)
        row.update(loss=loss, grad_norm=jnp.linalg.norm(grad), position=state.w, grads=jnp.asarray(1, jnp.int32),
                   oscillation=jnp.where(state.step > 0, oscillation, jnp.nan),
                   preconditioned_sharpness=row["sharpness"], edge_ratio=0.5 * row["lr_sharpness"])
        new_w = state.w - self.lr * grad
        return GDState(new_w, vectors, grad, state.step + 1), row


@register_process("gd", GDOptions, "gradient descent w <- w - lr * g(w)", discrete=True)
def build_gd(problem, spec, options) -> GradientDescent:
    return GradientDescent(
        name="gd", lr=spec.lr, spectrum=spec.spectrum, key=process_key(spec.seed, "gd"),
        objective=problem.objective,
    )
