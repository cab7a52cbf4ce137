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

from eosflow.flows.rod import (
    Ends,
    RodFlowOptions,
    RodModel,
    along_rod_kick,
    integrate,
    oscillation_row,
    parity_kick,
    unit,
)
from eosflow.process import process_key, register_process
from eosflow.spectrum import spectrum_row

# below eta s = 1 GD does not alternate along u; the magnitude then decays at this rate at most
SLOWEST_MULTIPLIER = float(np.exp(-2.0))


class EdgeState(NamedTuple):
    centre: Array
    direction: Array  # unit oscillation direction u
    magnitude: Array  # oscillation half-amplitude m >= 0
    vectors: Array
    step: Array


class EdgeTerms(NamedTuple):
    ends: Ends
    rayleigh_quotient: Array  # u^T H(x) u


@dataclasses.dataclass(frozen=True)
class EdgeFlowOptions(RodFlowOptions):
    """The rod flow's options: ``substeps`` and ``correction``."""


class EdgeFlow(RodModel):
    """Centre, unit direction and magnitude; see the module docstring for the vector field."""

    def init(self, w0: Array) -> EdgeState:
        """Centre at w0, no oscillation (m = 0), u along -g(w0); the first step's kick seeds m."""
        vectors = self.initial_vectors(w0)
        direction, length = unit(-self.objective.grad(w0))
        direction = jnp.where(length > 0, direction, vectors[:, 0])  # a random direction if g(w0) = 0
        return EdgeState(w0, direction, jnp.zeros((), w0.dtype), vectors, jnp.asarray(0))

    def field(self, z: tuple[Array, Array, Array]) -> tuple[tuple[Array, Array, Array], EdgeTerms]:
        """(dx/dt, du/dt, d log m/dt) at z = (x, u, m)."""
        centre, direction, magnitude = z
        ends = self.ends(centre, direction, magnitude)
        curvature = self.objective.hvp(centre, direction)
        rayleigh = jnp.vdot(direction, curvature)
        growth = jnp.log(jnp.maximum(self.lr * ends.sharpness_along - 1.0, SLOWEST_MULTIPLIER))
        velocity = (ends.centre_velocity, self.lr * (curvature - rayleigh * direction), growth)
        return velocity, EdgeTerms(ends, rayleigh)

    @staticmethod
    def update(z, velocity, h):
        """Euler for x, Euler then renormalization for u, exact exponential growth for m."""
        (centre, direction, magnitude), (dx, du, growth) = z, velocity
        return centre + h * dx, unit(direction + h * du)[0], magnitude * jnp.exp(h * growth)

    def step(self, state: EdgeState) -> tuple[EdgeState, dict[str, Array]]:
        vectors, row = spectrum_row(self.objective, state.centre, state.vectors, state.step, self.lr,
                                    self.spectrum)
        z = (state.centre, state.direction, state.magnitude)
        (centre, direction, magnitude), terms = integrate(self.field, self.update, z, self.substeps)
        # the kick along u: the signed oscillation m u gains u . (-1)^k tau_k (a sign change flips u) in
        # proportion h^2 / (h^2 + m^2), h = GD's half-step: it seeds the oscillation, it does not steer it
        kick = parity_kick(state.step, state.centre, centre, terms.ends, self.lr)
        signed = magnitude + along_rod_kick(direction, magnitude, kick, terms.ends, self.lr)
        magnitude, direction = jnp.abs(signed), jnp.where(signed < 0, -direction, direction)
        row.update(oscillation_row(self.objective, state.centre, terms.ends, self.lr, state.direction,
                                   state.magnitude))
        row.update(rayleigh_quotient=terms.rayleigh_quotient,
                   grads=jnp.asarray(2 * self.substeps, jnp.int32),
                   hvps=row["hvps"] + self.substeps * (1 + 2 * int(self.correction)))
        return EdgeState(centre, direction, magnitude, vectors, state.step + 1), row


@register_process("edge_flow", EdgeFlowOptions,
                  "edge flow: centre on the symmetrized loss, Oja direction, oscillation magnitude")
def build_edge_flow(problem, spec, options: EdgeFlowOptions) -> EdgeFlow:
    return EdgeFlow(
        name="edge_flow", lr=spec.lr, spectrum=spec.spectrum, key=process_key(spec.seed, "edge_flow"),
        objective=problem.objective, substeps=options.substeps, correction=options.correction,
    )
