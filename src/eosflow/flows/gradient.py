"""Gradient flow, dw/dt = -eta g(w), integrated with sharpness-adaptive Euler or RK4 substeps.

Time is measured in optimizer steps, so one unit of time is one GD step. Each step is split into
n = clip(ceil(eta S / courant), substeps, max_substeps) substeps (:func:`substep_count`), which
keeps dt * eta * S <= courant for the stiffest tracked mode.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.flows.flow import Flow, Measured, position_grads, prediction_row, register_flow, value_and_grad_at
from eosflow.flows.integrate import STAGES, UPDATES, SubstepOptions


@dataclasses.dataclass(frozen=True)
class GradientFlowOptions(SubstepOptions):
    method: Literal["euler", "rk4"] = option("euler", "integrator of each substep")


class GradientFlow(Flow):
    options: GradientFlowOptions = eqx.field(static=True)

    def start(self, w0: Array) -> Array:
        return w0

    def field(self, w: Array, measured: Measured | None = None) -> tuple[Array, tuple[Array, Array]]:
        """(-eta g(w), (L(w), g(w))); at the ``measured`` position, the measurement's (L, g)."""
        loss, grad = value_and_grad_at(self.objective, measured)(w)
        return -self.lr * grad, (loss, grad)

    def term(self, measured: Measured, n: Array | int):
        return lambda w: self.field(w, measured)

    def update(self, field, z, h, key):
        return UPDATES[self.options.method](field, z, h, key)

    def observe(self, w: Array, aux: tuple[Array, Array], measured: Measured, n: Array | int) -> dict[str, Array]:
        loss, grad = aux
        row = prediction_row(self.lr, loss, grad, jnp.zeros((1,), w.dtype), measured.vectors[:, 0], self.spectrum.k_max)
        grads = STAGES[self.options.method] * n - 1 + position_grads(measured)  # the first at the position
        return {**row, "grads": grads, "substeps": n}


register_flow(
    "gradient_flow", GradientFlow, GradientFlowOptions, "gradient flow dw/dt = -lr * g(w) (Euler or RK4 substeps)"
)
