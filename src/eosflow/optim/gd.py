"""Gradient descent, w_{k+1} = w_k - eta g(w_k), with the top Hessian eigenpairs tracked.

Each step also records ``edge_ratio`` = eta S / 2 (1 at the edge of stability, as for every
optimizer in :mod:`eosflow.optim.adaptive`; P = I, so ``preconditioned_sharpness`` is S) and GD's
oscillation read off GD alone: for w_k = c_k + (-1)^k delta_k with a linearly drifting centre,
|w_{k+1} - 2 w_k + w_{k-1}| / 4 = (eta / 4) |g_k - g_{k-1}| = |delta_k|.
When it bounces (<g_k, g_{k-1}> < 0) the eigensolver is warm-started from the vectors of step
k - 2, on the same side of the orbit, moved on by their change since step k - 4, damped by the
factor that would best have predicted step k - 2 (``warm_start``, :func:`eosflow.tracker.gd_warm_start`);
the measurement never feeds back into the iterates.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.objective import Objective
from eosflow.process import ScannedProcess, register_process, scanned_fields
from eosflow.spectrum import carried, tracked_row, value_grad_and_tracked
from eosflow.tracker import WarmStart, gd_warm_start, start_history


class GDState(NamedTuple):
    w: Array
    vectors: Array  # d x k: eigenvectors measured at the previous step (t - 1)
    older: Array  # h x d x k: those of steps t - 2, ..., t - 1 - h (for the warm start; h = 5 or 3)
    grad: Array  # the previous step's gradient (for ``oscillation``)
    step: Array


@dataclasses.dataclass(frozen=True)
class GDOptions:
    """Gradient descent's only option is where its eigensolver starts (besides ``lr`` and ``[spectrum]``)."""

    warm_start: WarmStart = option(
        "fitted",
        "eigensolver start: fitted (same-side vectors moved on by their last change, damped by the "
        "factor in [0, 1] that best predicted the last same-side measurement), extrapolated (undamped), "
        "same_side (step t-2's when GD bounces, else t-1's) or previous (step t-1's)",
    )


class GradientDescent(ScannedProcess):
    objective: Objective
    options: GDOptions = eqx.field(static=True, default=GDOptions())

    def init(self, w0: Array) -> GDState:
        vectors = self.initial_vectors(w0)
        return GDState(w0, vectors, start_history(vectors, self.options.warm_start), jnp.zeros_like(w0), jnp.asarray(0))

    def step(self, state: GDState) -> tuple[GDState, dict[str, Array]]:
        history = jnp.concatenate([state.vectors[None], state.older])  # h + 1 x d x k

        def warm(value):  # GD bounces when this step's gradient g = value[1] points against the last one
            return gd_warm_start(history, jnp.vdot(value[1], state.grad) < 0, self.options.warm_start)

        # with every = 1 history holds the measurements of steps k - 1, k - 2, ...; else the last one starts
        start = warm if self.spectrum.every == 1 else None
        (loss, grad), pairs = value_grad_and_tracked(
            self.objective, state.w, state.vectors, state.step, self.spectrum, start=start
        )
        vectors, row = carried(pairs, self.spectrum.carry, state.vectors), tracked_row(pairs, self.lr, self.spectrum)
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
        return GDState(new_w, vectors, history[:-1], grad, state.step + 1), row

    def constant_rows(self) -> tuple[str, ...]:
        """With ``spectrum.every = 0``: the unmeasured tracker's rows (NaN, 0 HVPs) and ``grads`` (one a step)."""
        return () if self.spectrum.every else (*UNMEASURED_ROWS, "grads")


# the rows of a step without a measurement (tracked_row of unmeasured pairs, and what GD reads off its sharpness)
UNMEASURED_ROWS = (
    "sharpness",
    "lr_sharpness",
    "eigenvalues",
    "hvps",
    "measurement_hvps",
    "residual",
    "preconditioned_sharpness",
    "edge_ratio",
)


@register_process("gd", GDOptions, "gradient descent w <- w - lr * g(w)", discrete=True)
def build_gd(problem, spec, options) -> GradientDescent:
    return GradientDescent(**scanned_fields("gd", spec, problem.objective), options=options)
