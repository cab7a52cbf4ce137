"""The stable flow of each momentum / adaptive optimizer: its ODE limit in (w, D, nu), nu smooth.

    dw/dt = -lr D / P(nu),    dD/dt = c (kappa g - D),    dnu/dt = c2 (s(g) - nu)

(see :mod:`eosflow.flows.moments` and docs/adaptive.md): below the edge of stability it follows
the optimizer to O(lr^2) per step; past the edge, like GD's gradient flow, it does not oscillate
and leaves the optimizer. One gradient per Euler substep. Registered as ``<optimizer>_stable_flow``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

from eosflow.flows.flow import Measured, position_grads
from eosflow.flows.moments import (
    MomentFlowOptions,
    OptimizerModel,
    Phase,
    register_models,
)


class StableFlow(OptimizerModel):
    def start(self, w0: Array) -> Phase:
        return self.start_phase(w0)

    def field(self, z: Phase, measured: Measured, h: Array | float) -> tuple[Phase, dict]:  # type: ignore[override]
        velocity, loss, grad = self.stable_velocity(z, h, measured)
        return velocity, {"loss": loss, "grad_norm": jnp.linalg.norm(grad), "cost": {"grads": 1}}

    def observe(self, z: Phase, aux: dict, measured: Measured, n: Array | int) -> dict:
        return {
            "loss": aux["loss"],
            "predicted_loss": aux["loss"],
            "grad_norm": aux["grad_norm"],
            **self.costs(aux, n, position_grads(measured) - 1),
        }


register_models("stable_flow", StableFlow, MomentFlowOptions, "stable flow (the ODE limit, nu smooth)")
