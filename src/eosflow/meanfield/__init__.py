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

Since grad V(p_i; rho_N) = N dL/dp_i, this field on the flat (p, delta) is the rod flow's field
without its correction (:func:`eosflow.flows.rod.rod_field`, lr = N eta): the kinetic limit of the
free-energy picture is rod flow in particle coordinates. There is one implementation, that field;
this module gives its particle view, the seeding and the macroscopic quantities.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.flows.integrate import integrate
from eosflow.flows.rod import Ends, rod_field
from eosflow.objective import Objective

__all__ = [
    "Particles",
    "Macroscopic",
    "to_particles",
    "to_flat",
    "seed",
    "observe",
    "velocity",
    "particle_gd",
    "particle_model",
    "macroscopic",
    "gd_oscillation",
]


class Particles(NamedTuple):
    centres: Array  # (N, 1 + D): rows p_i = (a_i, w_i)
    oscillation: Array  # (N, 1 + D): rows delta_i


def to_particles(w: Array, width: int) -> Array:
    """Flat (a_1..a_N, w_1..w_N) -> (N, 1 + D) rows (a_i, w_i)."""
    return jnp.concatenate([w[:width, None], w[width:].reshape(width, -1)], axis=1)


def to_flat(particles: Array) -> Array:
    """(N, 1 + D) rows (a_i, w_i) -> flat (a_1..a_N, w_1..w_N)."""
    return jnp.concatenate([particles[:, 0], particles[:, 1:].ravel()])


class Macroscopic(NamedTuple):
    risk: Array  # R(rho_N) at the centres
    averaged_risk: Array  # 1/2 (R(rho_+) + R(rho_-)): the predicted time-averaged loss
    free_energy: Array  # FF = averaged_risk - (1/eta) mean_i |delta_i|^2
    amplitude: Array  # sqrt(mean_i |delta_i|^2): the RMS oscillation per particle


def seed(objective: Objective, w0: Array, lr: float) -> tuple[Array, Array]:
    """The flat (p, delta) at t = 0: the half-step rod delta = lr/2 g(w0) (delta_i = eta/2 grad V(p_i))."""
    return w0, 0.5 * lr * objective.grad(w0)


def observe(objective: Objective, z: tuple[Array, Array], ends: Ends, lr: float, width: int) -> Macroscopic:
    """The macroscopic quantities at the flat z = (p, delta), from the rod's ends there (lr = N eta):
    mean_i |delta_i|^2 = |delta|^2 / N, so FF = averaged risk - |delta|^2 / lr."""
    p, delta = z
    norm_sq = jnp.sum(delta**2)
    return Macroscopic(objective.value(p), ends.mean_loss, ends.mean_loss - norm_sq / lr, jnp.sqrt(norm_sq / width))


def velocity(objective: Objective, state: Particles, eta: float) -> tuple[Particles, Macroscopic]:
    """(dp/dt, ddelta/dt) of the particle model and the macroscopic quantities at ``state``: the rod
    flow's field (c = 0) at the flat (p, delta), with lr = N eta, in particle coordinates."""
    width = state.centres.shape[0]
    lr = width * eta
    z = (to_flat(state.centres), to_flat(state.oscillation))
    (centre_rate, rod_rate), ends = rod_field(objective, lr)(z)
    rates = Particles(to_particles(centre_rate, width), to_particles(rod_rate, width))
    return rates, observe(objective, z, ends, lr, width)


def particle_model(
    objective: Objective, w0: Array, width: int, eta: float, steps: int, substeps: int = 4, record_every: int = 1
) -> tuple[Particles, Macroscopic, Particles]:
    """Integrate the particle model for ``steps`` units of time (Euler, ``substeps`` per unit).

    Seeded with the half-step rod delta_i = eta/2 grad V(p_i) (GD's first iterate sits eta g away
    from w0; the off-critical part of the seed decays at rate ~2). Returns the final state, the
    macroscopic quantities at every unit of time, and the particles every ``record_every`` steps.
    """
    lr = width * eta
    field = rod_field(objective, lr)

    def one_step(z, _):
        new, ends = integrate(field, z, substeps)
        return new, (observe(objective, z, ends, lr, width), z)

    final, (observed, states) = _scan(one_step, seed(objective, w0, lr), steps)
    snapshots = jax.tree_util.tree_map(lambda x: jax.vmap(lambda w: to_particles(w, width))(x[::record_every]), states)
    return Particles(*(to_particles(x, width) for x in final)), observed, Particles(*snapshots)


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


def _scan(body, state, steps):
    """``lax.scan`` of ``body`` compiled for this call: ``body`` is a new closure at every call, so a
    cached jit could never reuse it and would keep every compiled copy for the life of the process."""
    return jax.jit(lambda state: jax.lax.scan(body, state, None, length=steps))(state)


def macroscopic(observed: Macroscopic) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in observed._asdict().items()}
