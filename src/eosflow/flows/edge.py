"""Edge flow: centre, oscillation direction and oscillation magnitude (eosflow's continuous model).

Derived in docs/edge_flow.md to satisfy the published claims of Marion (2026); the equations
are eosflow's own. GD is modelled as w_k = x(k) + (-1)^k m(k) u(k) with |u| = 1, m >= 0:

    dx/dt      = -eta grad L_sym(x) - c eta^2 Hbar grad L_sym,   L_sym = [L(x + m u) + L(x - m u)] / 2
    du/dt      =  eta (H(x) u - (u^T H(x) u) u)                  (Oja / Rayleigh-quotient ascent)
    d log m/dt =  log max(eta s - 1, e^-2),     s = u . [g(x + m u) - g(x - m u)] / (2 m)

s is the curvature along u averaged over the segment x +- m u (from the two gradients). Per
substep: two gradients (the ends), one HVP (the direction), and two HVPs for the backward-error
correction c (shared with the rod flow).
After each unit of time the signed oscillation m u absorbs the component along u of the part of
GD's step the smooth centre did not take, with GD's parity, as in the rod flow (in proportion
h^2/(h^2 + m^2), h = GD's half-step (eta/2)|E|: a seed, not a steer of an established oscillation).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.config import SpecError
from eosflow.flows.flow import Measured, centre_and_rod, register_flow
from eosflow.flows.integrate import Growth, exact
from eosflow.flows.rod import Ends, RodFlowOptions, RodModel, along_rod_kick, oscillation_row, parity_kick, unit

# below eta s = 1 GD does not alternate along u; the magnitude then decays at this rate at most
SLOWEST_MULTIPLIER = float(np.exp(-2.0))


class EdgePoint(NamedTuple):
    """The edge flow's variables (and, with a :class:`Growth` magnitude, their velocity)."""

    centre: Array  # x
    direction: Array  # unit oscillation direction u
    magnitude: Array  # oscillation half-amplitude m >= 0


class EdgeTerms(NamedTuple):
    ends: Ends
    rayleigh_quotient: Array  # u^T H(x) u


@dataclasses.dataclass(frozen=True)
class EdgeFlowOptions(RodFlowOptions):
    """The rod flow's options: ``substeps``, ``correction`` and ``curvature`` ("hvp" or "lookahead")."""

    def check(self, where: str) -> None:
        if self.curvature == "secant":
            raise SpecError(f'`{where}.curvature` = "secant" is rod_flow\'s only; edge_flow takes "hvp" or "lookahead"')


class EdgeFlow(RodModel):
    """Centre, unit direction and magnitude; see the module docstring for the vector field."""

    def start(self, w0: Array) -> EdgePoint:
        """Centre at w0, no oscillation (m = 0), u along -g(w0); the first step's kick seeds m."""
        vectors = self.initial_vectors(w0)
        direction, length = unit(-self.objective.grad(w0))
        direction = jnp.where(length > 0, direction, vectors[:, 0])  # a random direction if g(w0) = 0
        return EdgePoint(w0, direction, jnp.zeros((), w0.dtype))

    def anchor(self, window) -> EdgePoint:
        """GD's iterates at k-2 .. k+2 as x_k + (-1)^k m u: the centre c_k, and m u = the rod r_k (u as at
        w0 where r_k = 0)."""
        centre, rod = centre_and_rod(window)
        direction, length = unit(rod)
        return EdgePoint(centre, jnp.where(length > 0, direction, self.start(centre).direction), length)

    def field(self, z: EdgePoint) -> tuple[EdgePoint, EdgeTerms]:
        """(dx/dt, du/dt, d log m/dt) at z = (x, u, m)."""
        centre, direction, magnitude = z
        ends = self.ends(centre, direction, magnitude)
        curvature = self.objective.hvp(centre, direction)
        rayleigh = jnp.vdot(direction, curvature)
        growth = jnp.log(jnp.maximum(self.lr * ends.sharpness_along - 1.0, SLOWEST_MULTIPLIER))
        # a velocity: its magnitude leaf is a Growth rate (see integrate.exact)
        turning = self.lr * (curvature - rayleigh * direction)
        velocity = EdgePoint(ends.centre_velocity, turning, Growth(growth))  # type: ignore[arg-type]
        return velocity, EdgeTerms(ends, rayleigh)

    def update(self, field, z, h, key):
        """Euler for x, Euler then renormalization for u, exact exponential growth for m."""
        (centre, direction, magnitude), terms = exact(field, z, h)
        return EdgePoint(centre, unit(direction)[0], magnitude), terms

    def finish(self, z: EdgePoint, end: EdgePoint, terms: EdgeTerms, step: Array) -> EdgePoint:
        """The kick along u: the signed oscillation m u gains u . (-1)^k tau_k (a sign change flips u) in
        proportion h^2 / (h^2 + m^2), h = GD's half-step: it seeds the oscillation, it does not steer it."""
        centre, direction, magnitude = end
        kick = parity_kick(step, z[0], centre, terms.ends, self.lr)
        signed = magnitude + along_rod_kick(direction, magnitude, kick, terms.ends, self.lr)
        return EdgePoint(centre, jnp.where(signed < 0, -direction, direction), jnp.abs(signed))

    def observe(self, z, terms: EdgeTerms, measured: Measured, n: Array | int) -> dict[str, Array]:
        row = oscillation_row(self.objective, z[0], terms.ends, self.lr, z[1], z[2])
        return {**row, "rayleigh_quotient": terms.rayleigh_quotient, **self.cost(n, hvps_per_substep=1)}


register_flow(
    "edge_flow",
    EdgeFlow,
    EdgeFlowOptions,
    "edge flow: centre on the symmetrized loss, Oja direction, oscillation magnitude",
)
