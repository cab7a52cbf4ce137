"""The mean-field two-layer network at the edge of stability: particles with their oscillation.

Network f(x) = (1/N) sum_i a_i sigma(w_i . x), particles p_i = (a_i, w_i) in R^(1+D), risk
R(rho) = E_n 1/2 (int a sigma(w . x_n) drho - y_n)^2 with potential V(p; rho) = dR/drho (p).
GD in mean-field time, p_i <- p_i - eta grad_p V(p_i; rho_N), is GD on the flat problem with
lr = N eta (``two_layer_meanfield`` does not rescale). Each particle carries its centre p_i and
its share delta_i of the period-2 oscillation (GD visits p_i +- delta_i on alternate steps), and
with rho_+- the empirical measures of p_j +- delta_j (docs/meanfield.md derives this):

    dp_i/dt     = -eta/2 [grad V(p_i + delta_i; rho_+) + grad V(p_i - delta_i; rho_-)]
    ddelta_i/dt =  eta/2 [grad V(p_i + delta_i; rho_+) - grad V(p_i - delta_i; rho_-)] - 2 delta_i

As N -> infinity the empirical measure mu_N of (p, delta) solves the continuity equation
d_t mu + div_(p, delta)(mu (v_p, v_delta)) = 0, a Wasserstein-2 descent (in p) / ascent (in delta)
of the macroscopic free energy

    FF[mu] = 1/2 (R(rho_+) + R(rho_-)) - (1/eta) int |delta|^2 dmu,

and the reduced free energy (delta at its fixed point) is non-increasing.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.objective import Objective

__all__ = ["Particles", "Macroscopic", "to_particles", "to_flat", "velocity", "euler_step", "particle_gd", "particle_model", "macroscopic",
           "gd_oscillation"]


class Particles(NamedTuple):
    centres: Array  # (N, 1 + D): rows p_i = (a_i, w_i)
    oscillation: Array  # (N, 1 + D): rows delta_i


def to_particles(w: Array, width: int) -> Array:
    """Flat (a_1..a_N, w_1..w_N) -> (N, 1 + D) rows (a_i, w_i)."""
    return jnp.concatenate([w[:width, None], w[width:].reshape(width, -1)], axis=1)


def to_flat(particles: Array) -> Array:
    """(N, 1 + D) rows (a_i, w_i) -> flat (a_1..a_N, w_1..w_N)."""
    return jnp.concatenate([particles[:, 0], particles[:, 1:].ravel()])


def potential_gradient(objective: Objective, particles: Array) -> tuple[Array, Array]:
    """(R(rho_N), grad_p V(p_i; rho_N) for every i) = (L(w), N dL/dp_i)."""
    width = particles.shape[0]
    loss, grad = objective.value_and_grad(to_flat(particles))
    return loss, width * to_particles(grad, width)


class Macroscopic(NamedTuple):
    risk: Array  # R(rho_N) at the centres
    averaged_risk: Array  # 1/2 (R(rho_+) + R(rho_-)): the predicted time-averaged loss
    free_energy: Array  # FF = averaged_risk - (1/eta) mean_i |delta_i|^2
    amplitude: Array  # sqrt(mean_i |delta_i|^2): the RMS oscillation per particle


def velocity(objective: Objective, state: Particles, eta: float) -> tuple[Particles, Macroscopic]:
    """(dp/dt, ddelta/dt) of the particle model and the macroscopic quantities at ``state``."""
    p, delta = state
    risk = objective.value(to_flat(p))
    plus_risk, plus = potential_gradient(objective, p + delta)
    minus_risk, minus = potential_gradient(objective, p - delta)
    averaged = 0.5 * (plus_risk + minus_risk)
    spread = jnp.mean(jnp.sum(delta**2, axis=1))
    rates = Particles(-0.5 * eta * (plus + minus), 0.5 * eta * (plus - minus) - 2.0 * delta)
    return rates, Macroscopic(risk, averaged, averaged - spread / eta, jnp.sqrt(spread))


def euler_step(objective: Objective, state: Particles, eta: float, substeps) -> tuple[Particles, Macroscopic]:
    """One unit of time in ``substeps`` Euler substeps (a Python or traced int), and the macroscopic
    quantities at its start, whose rates serve the first substep. Cost: 2 substeps + 1 gradients."""
    dt = 1.0 / substeps

    def move(s: Particles, rates: Particles) -> Particles:
        return jax.tree_util.tree_map(lambda x, v: x + dt * v, s, rates)

    rates, observed = velocity(objective, state, eta)
    state = jax.lax.fori_loop(1, substeps, lambda _, s: move(s, velocity(objective, s, eta)[0]), move(state, rates))
    return state, observed


def particle_model(objective: Objective, w0: Array, width: int, eta: float, steps: int, substeps: int = 4,
                   record_every: int = 1) -> tuple[Particles, Macroscopic, Particles]:
    """Integrate the particle model for ``steps`` units of time (Euler, ``substeps`` per unit).

    Seeded with the half-step rod delta_i = eta/2 grad V(p_i) (GD's first iterate sits eta g away
    from w0; the off-critical part of the seed decays at rate ~2). Returns the final state, the
    macroscopic quantities at every unit of time, and the particles every ``record_every`` steps.
    """
    p0 = to_particles(w0, width)
    _, grad = potential_gradient(objective, p0)
    state = Particles(p0, 0.5 * eta * grad)

    def one_step(state, _):
        new, observed = euler_step(objective, state, eta, substeps)
        return new, (observed, state)

    final, (observed, states) = _scan(one_step, state, steps)
    snapshots = jax.tree_util.tree_map(lambda x: x[::record_every], states)
    return final, observed, snapshots


def particle_gd(objective: Objective, w0: Array, width: int, eta: float, steps: int) -> tuple[Array, Array]:
    """GD in mean-field time (lr = N eta): the iterates' particles (steps + 1, N, 1 + D) and losses."""

    def one_step(w, _):
        loss, grad = objective.value_and_grad(w)
        return w - width * eta * grad, (w, loss)

    last, (ws, losses) = _scan(one_step, w0, steps)
    ws = jnp.concatenate([ws, last[None]])
    return jax.vmap(lambda w: to_particles(w, width))(ws), losses


def gd_oscillation(particles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GD's centre and its period-2 share per particle, from three consecutive iterates:
    w_k = p + (-1)^k delta  =>  delta_k = (-1)^k (w_k - (w_{k-1} + w_{k+1})/2) / 2 (p linear in k cancels).
    Returns (centres (T-2, N, 1+D), delta (T-2, N, 1+D)) for k = 1 .. T-2."""
    particles = np.asarray(particles)
    middle = particles[1:-1]
    neighbours = 0.5 * (particles[:-2] + particles[2:])
    sign = (-1.0) ** np.arange(1, len(particles) - 1)[:, None, None]
    return 0.5 * (middle + neighbours), sign * 0.5 * (middle - neighbours)


@eqx.filter_jit
def _scan(body, state, steps):
    return jax.lax.scan(body, state, None, length=steps)


def macroscopic(observed: Macroscopic) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in observed._asdict().items()}
