"""Rod flow in the phase space (w, m) of a momentum / adaptive optimizer, nu smooth (ours; docs/adaptive.md).

With P frozen, one step of the optimizer is z_{k+1} = z_k + F(z_k) on z = (w, m) (m in the rule's
own units). Modelling z_k = zeta(k) + (-1)^k rho(k) with a smooth centre zeta and a sign-free rod
rho, the odd part of the step gives, exactly as for GD's rod (F = -lr g),

    d rho/dt = -F_odd(zeta, rho) - 2 rho,     F_odd = [F(zeta + rho) - F(zeta - rho)] / 2,

and F is affine in m, so F_odd depends on rho_m and on the odd part O of the gradient over the
ends w = zeta_w +- rho_w only. The centre is the stable flow (:mod:`eosflow.flows.stable`) driven
by the even parts E = [g(zeta_w + rho_w) + g(zeta_w - rho_w)] / 2 and s_bar = [s(g+) + s(g-)] / 2, so
the oscillation feeds nu as it does in the optimizer. Linearized at a small rod on a quadratic,
rho grows exactly when lr * (preconditioned curvature) exceeds the optimizer's threshold
(2 (1 + b)/(1 - b) for EMA momentum, 2 (1 + b) classical). After each unit of time the rod's w part
absorbs (-1)^k tau_k, tau_k = the centre's w-increment minus its Euler step: what seeds the
oscillation (as GD's rod does). Two gradients per substep. Registered as ``<optimizer>_rod_flow``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.flows.flow import rod_of
from eosflow.flows.moments import (
    MomentFlowOptions,
    OptimizerModel,
    Phase,
    register_models,
)
from eosflow.flows.rod import unit
from eosflow.optim.adaptive import OptimizerState, RuleState


class Rod(NamedTuple):
    w: Array  # (d,) rho_w, the optimizer's iterate is modelled as zeta_w + (-1)^k rho_w
    m: Array  # (d,) rho_m, in the rule's units of m


class PhaseRodFlow(OptimizerModel):
    def start(self, w0: Array) -> tuple[Phase, Rod]:
        centre = self.start_phase(w0)
        return centre, Rod(jnp.zeros_like(w0), jnp.zeros_like(w0))

    def centre(self, z: tuple[Phase, Rod]) -> Phase:
        return z[0]

    def anchor(self, window: Sequence[OptimizerState]) -> tuple[Phase, Rod]:
        """The centre phase (:meth:`OptimizerModel.anchor`) and the rod (-1)^k (z_k - centre of z at k),
        z = (w, m): the optimizer's own period-2 part at step k (states at k-2 .. k+2)."""
        k = int(window[2].step)
        return super().anchor(window), Rod(rod_of([s.w for s in window], k), rod_of([s.rule.m for s in window], k))

    def increment(self, m: Array, grad: Array, preconditioner: Array) -> tuple[Array, Array]:
        """F(w, m) = (w_{k+1} - w_k, m_{k+1} - m_k) with P frozen and no bias correction (given g(w))."""
        rule = dataclasses.replace(self.moments.rule, bias_correction=False)
        new = rule.moments(RuleState(m, jnp.zeros(()), jnp.asarray(0)), grad)
        return -self.lr * rule.direction(new, grad) / preconditioner, new.m - m

    def field(self, z: tuple[Phase, Rod], setup: Any, h: Array | float) -> tuple[tuple[Phase, Rod], dict]:  # type: ignore[override]
        centre, rod = z
        mo = self.moments
        losses, grads = jax.vmap(self.objective.value_and_grad)(jnp.stack([centre.w + rod.w, centre.w - rod.w]))
        even, odd = 0.5 * (grads[0] + grads[1]), 0.5 * (grads[0] - grads[1])
        second = 0.5 * (mo.second(grads[0]) + mo.second(grads[1]))
        p = mo.preconditioner(centre)
        plus = self.increment(rod.m, grads[0], p)
        minus = self.increment(-rod.m, grads[1], p)
        odd_w, odd_m = (0.5 * (a - b) for a, b in zip(plus, minus))
        velocity = (mo.velocity(centre, even, second, h), Rod(-odd_w - 2.0 * rod.w, -odd_m - 2.0 * rod.m))
        aux = {
            "mean_loss": jnp.mean(losses),
            "grad_norm": jnp.linalg.norm(even),
            "sharpness_along": jnp.vdot(rod.w, odd) / jnp.maximum(jnp.vdot(rod.w, rod.w), jnp.finfo(p.dtype).tiny),
            "centre_velocity": velocity[0].w,
            "cost": {"grads": 2},
        }
        return velocity, aux

    def finish(self, z: tuple[Phase, Rod], new_z: tuple[Phase, Rod], aux: dict, step: Array) -> Any:
        """The rod's w part absorbs (-1)^k [zeta_w(k+1) - zeta_w(k) - d zeta_w/dt(k)]."""
        parity = 1 - 2 * (step % 2)
        kick = parity * (new_z[0].w - z[0].w - aux["centre_velocity"])
        return new_z[0], new_z[1]._replace(w=new_z[1].w + kick)

    def observe(self, z: tuple[Phase, Rod], aux: dict, setup: Any, n: Array | int) -> dict:
        centre, rod = z
        direction, length = unit(rod.w)
        return {
            "loss": self.objective.value(centre.w),
            "predicted_loss": aux["mean_loss"],
            "amplitude": length,
            "top_vector": direction,
            "grad_norm": aux["grad_norm"],
            "sharpness_along": aux["sharpness_along"],
            **self.costs(aux, n),
        }


register_models("rod_flow", PhaseRodFlow, MomentFlowOptions, "rod flow in (w, m) phase space, nu smooth")
