"""The mean-field particle model as a process: rod flow in particle coordinates, with its own seeding.

On ``two_layer_meanfield`` (f(x) = (1/N) sum_i a_i sigma(w_i . x), GD with lr = N eta) GD visits
p_i +- delta_i on alternate steps, and averaging two steps gives (:mod:`eosflow.meanfield`,
docs/meanfield.md)

    dp_i/dt     = -eta/2 [grad V(p_i + delta_i; rho_+) + grad V(p_i - delta_i; rho_-)]
    ddelta_i/dt =  eta/2 [grad V(p_i + delta_i; rho_+) - grad V(p_i - delta_i; rho_-)] - 2 delta_i,

which, since grad V(p_i; rho_N) = N dL/dp_i, is the rod flow's field without its correction
(:func:`eosflow.flows.rod.rod_field` with c = 0) on the flat (p, delta) = (x, r): the kinetic limit
of the free-energy picture is rod flow in particle coordinates. What differs is the seeding, the
half-step rod delta(0) = lr/2 g(w0) instead of the rod flow's zero rod and parity kick, and the
sharpness-adaptive substep count. Rows: ``position`` (the centres, flat), ``loss`` = L(centres),
``predicted_loss`` = 1/2 (L(w + delta) + L(w - delta)) (GD's two-step average), ``free_energy``
FF = predicted_loss - |delta|^2 / lr, and ``amplitude`` = |delta|, which is GD's
|w_{k+1} - 2 w_k + w_{k-1}| / 4 (``oscillation``). Cost per substep: two gradients.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from eosflow import meanfield as mf
from eosflow.flows.flow import Flow, Measured, centre_and_rod, register_flow
from eosflow.flows.integrate import SubstepOptions
from eosflow.flows.rod import Ends, rod_field


class ParticleModel(Flow):
    options: SubstepOptions = eqx.field(static=True)
    width: int = eqx.field(static=True)  # N, the number of particles

    def start(self, w0: Array) -> tuple[Array, Array]:
        """(p, delta) = (w0, lr/2 g(w0)): GD's first iterate sits lr g(w0) away from w0."""
        return mf.seed(self.objective, w0, self.lr)

    def anchor(self, window) -> tuple[Array, Array]:
        """(p, delta) on GD's iterates at k-2 .. k+2: the centre c_k and the rod r_k = (-1)^k (w_k - c_k)
        (the field is odd in delta and has no parity kick, so delta's sign is free)."""
        return centre_and_rod(window)

    def field(self, z: tuple[Array, Array]) -> tuple[tuple[Array, Array], Ends]:
        return rod_field(self.objective, self.lr)(z)

    def observe(self, z: tuple[Array, Array], ends: Ends, measured: Measured, n: Any) -> dict[str, Array]:
        observed = mf.observe(self.objective, z, ends, self.lr, self.width)
        return {
            "loss": observed.risk,
            "predicted_loss": observed.averaged_risk,
            "free_energy": observed.free_energy,
            "amplitude": jnp.linalg.norm(z[1]),
            "substeps": n,
            "grads": 2 * n + 1,
        }


register_flow(
    "particle_model",
    ParticleModel,
    SubstepOptions,
    "mean-field particle model: each neuron's centre and its share of GD's period-2 oscillation",
    problems=("two_layer_meanfield",),
    fields=lambda problem, spec, options: {"width": int(problem.info["width"])},
)
