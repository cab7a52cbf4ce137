"""Gradient flow, dw/dt = -eta g(w), integrated with sharpness-adaptive Euler or RK4 substeps.

Time is measured in optimizer steps, so one unit of time is one GD step. Each step is split into
n = clip(ceil(eta S / courant), substeps, max_substeps) substeps of length dt = 1/n, which keeps
dt * eta * S <= courant for the stiffest tracked mode (the reference code's rule
max(4, ceil(2 eta S)) is courant = 0.5, substeps = 4).

Also home of what every flow of this family shares: the substep options, the substep count and
the prediction fields of a row (:func:`prediction_row`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import SpecError, option
from eosflow.objective import Objective
from eosflow.process import ScannedProcess, process_key, register_process
from eosflow.spectrum import spectrum_row


@dataclasses.dataclass(frozen=True)
class SubstepOptions:
    substeps: int = option(4, "fewest substeps per unit of time (one GD step)", ge=1)
    courant: float = option(0.5, "largest eta * S * dt of one substep: more substeps when S is large", gt=0)
    max_substeps: int = option(64, "most substeps per unit of time", ge=1)

    def check(self, where: str) -> None:
        if self.substeps > self.max_substeps:
            raise SpecError(
                f"`{where}.substeps` = {self.substeps} exceeds `{where}.max_substeps` = {self.max_substeps}"
            )


@dataclasses.dataclass(frozen=True)
class GradientFlowOptions(SubstepOptions):
    method: Literal["euler", "rk4"] = option("euler", "integrator of each substep")


def substep_count(lr: float, stiffness: Array, options: SubstepOptions) -> Array:
    """n = clip(ceil(eta * stiffness / courant), substeps, max_substeps); ``substeps`` if unknown."""
    n = jnp.ceil(lr * stiffness / options.courant)
    n = jnp.where(jnp.isfinite(n), n, options.substeps)
    return jnp.clip(n, options.substeps, options.max_substeps).astype(jnp.int32)


def prediction_row(lr: float, loss: Array, grad: Array, sigma_values: Array, top_vector: Array, k_max: int) -> dict:
    """The row fields a flow predicts, from its centre and Sigma's eigenvalues (descending).

    time-averaged loss       L + 1/2 <Sigma, H> = L + tr(Sigma) / eta     (H = 2/eta on Sigma's range)
    time-averaged ||g||^2    ||g||^2 + tr(H Sigma H) = ||g||^2 + 4 tr(Sigma) / eta^2
    amplitude                sqrt(largest eigenvalue of Sigma)
    """
    trace = jnp.sum(sigma_values)
    padding = jnp.zeros((k_max - sigma_values.shape[0],), sigma_values.dtype)
    return {
        "grad_norm": jnp.linalg.norm(grad),
        "predicted_loss": loss + trace / lr,
        "predicted_grad_norm_sq": jnp.sum(grad**2) + 4.0 * trace / lr**2,
        "covariance": jnp.concatenate([sigma_values, padding]),
        "amplitude": jnp.sqrt(jnp.maximum(sigma_values[0], 0.0)),
        "top_vector": top_vector,
    }


class FlowState(NamedTuple):
    w: Array  # the flow's position (its centre)
    vectors: Array  # tracked Hessian eigenvectors (warm start)
    sharpness: Array  # last measured S, which sets the substep count
    step: Array


class GradientFlow(ScannedProcess):
    objective: Objective
    options: GradientFlowOptions = eqx.field(static=True)

    def init(self, w0: Array) -> FlowState:
        return FlowState(w0, self.initial_vectors(w0), jnp.asarray(jnp.nan, w0.dtype), jnp.asarray(0))

    def velocity(self, w: Array) -> Array:
        return -self.lr * self.objective.grad(w)

    def step(self, state: FlowState) -> tuple[FlowState, dict[str, Array]]:
        w = state.w
        loss, grad = self.objective.value_and_grad(w)
        vectors, row = spectrum_row(self.objective, w, state.vectors, state.step, self.lr, self.spectrum)
        sharpness = jnp.where(jnp.isfinite(row["sharpness"]), row["sharpness"], state.sharpness)
        n = substep_count(self.lr, sharpness, self.options)
        dt = 1.0 / n
        body = _rk4 if self.options.method == "rk4" else _euler
        new_w = jax.lax.fori_loop(0, n, lambda _, x: body(self.velocity, x, dt), w)
        stages = 4 if self.options.method == "rk4" else 1
        no_sigma = jnp.zeros((1,), w.dtype)
        row.update(prediction_row(self.lr, loss, grad, no_sigma, vectors[:, 0], self.spectrum.k_max))
        row.update(position=w, loss=loss, grads=1 + stages * n, substeps=n)
        return FlowState(new_w, vectors, sharpness, state.step + 1), row


def _euler(velocity, w: Array, dt: Array) -> Array:
    return w + dt * velocity(w)


def _rk4(velocity, w: Array, dt: Array) -> Array:
    k1 = velocity(w)
    k2 = velocity(w + 0.5 * dt * k1)
    k3 = velocity(w + 0.5 * dt * k2)
    k4 = velocity(w + dt * k3)
    return w + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


@register_process("gradient_flow", GradientFlowOptions, "gradient flow dw/dt = -lr * g(w) (Euler or RK4 substeps)")
def build_gradient_flow(problem, spec, options: GradientFlowOptions) -> GradientFlow:
    return GradientFlow(
        name="gradient_flow", lr=spec.lr, spectrum=spec.spectrum, key=process_key(spec.seed, "gradient_flow"),
        objective=problem.objective, options=options,
    )
