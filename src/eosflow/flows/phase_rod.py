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

``rod_rate = "matched"`` (the default; docs/adaptive.md section 5b) replaces, on the rod's plane
rho_w = alpha e, rho_m = beta P e, the linear part M - I of that equation (M = -(I + dF), the rod's
one-step map) by log M, whose time-1 flow is M itself: below the edge the optimizer's mode there
rotates with |mu| = sqrt(b1) per step, which M - I damps ~8x too fast at b1 = 0.9. Two gradients per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.flows.flow import Measured, probe_floor, rod_of
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


class RodPlane(NamedTuple):
    """The rod's plane for one step, rho_w = alpha e and rho_m = beta P e, and the change of the rod's
    linear rate on it (``rod_rate = "matched"``)."""

    e: Array  # (d,) unit direction of the rod in w
    pe: Array  # (d,) P e, the direction of its m part
    correction: Array  # (2, 2) f(M) of :func:`matched_correction` on (alpha, beta)


@dataclasses.dataclass(frozen=True)
class PhaseRodOptions(MomentFlowOptions):
    rod_rate: Literal["matched", "first_order"] = option(
        "matched",
        "matched: on the rod's plane its linear rate is log M, M its one-step map, so the optimizer's "
        "rotating modes below the edge keep their damping sqrt(b1) per step (two gradients per step); "
        "first_order: M - I everywhere (docs/adaptive.md section 5b)",
    )


SLOWEST_RATE = -4.0  # a mode of M with |mu| < e^-4 dies within a step: it keeps its first-order rate


def matched_correction(m: Array) -> Array:
    """C = f(M) (2, 2), f(mu) = log mu - (mu - 1) on each eigenvalue mu of M with Re mu > 0 and
    log |mu| >= ``SLOWEST_RATE`` (0 on the others), so that M - I + C has the time-1 flow M on those
    modes: rotations of less than 90 degrees per step and decays no faster than e^-4, where a period-2
    rod is the mode's natural description. As a 2 x 2 matrix function, C = a I + c (M - tau I) with
    tau = tr M / 2, eigenvalues tau +- omega (omega real or imaginary), a = [f(mu+) + f(mu-)] / 2 and c
    the divided difference [f(mu+) - f(mu-)] / (mu+ - mu-) (near a double eigenvalue, its series
    f'(tau) + f'''(tau) (tau^2 - det M) / 6)."""
    eye = jnp.eye(2, dtype=m.dtype)
    tau, det = 0.5 * jnp.trace(m), jnp.linalg.det(m)
    disc = tau**2 - det
    omega = jnp.sqrt(jnp.abs(disc))
    # below eps^(1/5) |tau| a divided difference loses more to cancellation than its series is off
    big = omega > jnp.finfo(m.dtype).eps ** 0.2 * jnp.abs(tau)

    def usable(mu: Array) -> Array:
        return (mu > 0) & (jnp.log(jnp.where(mu > 0, mu, 1.0)) >= SLOWEST_RATE)

    def f(mu: Array) -> Array:
        mu_safe = jnp.where(usable(mu), mu, 1.0)
        return jnp.where(usable(mu), jnp.log(mu_safe) - (mu_safe - 1.0), 0.0)

    # real eigenvalues tau +- omega
    upper, lower = f(tau + omega), f(tau - omega)
    tau_safe = jnp.where(usable(tau), tau, 1.0)
    # near a double eigenvalue: f'(tau) + f'''(tau) (tau^2 - det) / 6, for both branches
    series = jnp.where(usable(tau), 1.0 / tau_safe - 1.0 + disc / (3.0 * tau_safe**3), 0.0)
    c_real = jnp.where(big, (upper - lower) / (2.0 * jnp.where(big, omega, 1.0)), series)
    a_real = 0.5 * (upper + lower)
    # complex eigenvalues tau +- i omega: f = log r + i theta - (tau - 1) - i omega
    r2 = jnp.where(det > 0, det, 1.0)
    rotating = (tau > 0) & (0.5 * jnp.log(r2) >= SLOWEST_RATE)
    theta = jnp.arctan2(omega, jnp.where(tau > 0, tau, 1.0))
    a_complex = jnp.where(rotating, 0.5 * jnp.log(r2) - (tau - 1.0), 0.0)
    c_complex = jnp.where(rotating, jnp.where(big, theta / jnp.where(big, omega, 1.0) - 1.0, series), 0.0)
    a, c = jnp.where(disc >= 0, a_real, a_complex), jnp.where(disc >= 0, c_real, c_complex)
    return a * eye + c * (m - tau * eye)


def rod_direction(w_part: Array, m_part: Array) -> Array:
    """The unit vector e spanning the columns of [w_part, m_part] best (the top left singular vector;
    zero if both vanish): the rod's direction even where its w part passes through zero."""
    x = jnp.stack([w_part, m_part], axis=1)
    gram = x.T @ x
    _, vectors = jnp.linalg.eigh(gram)
    direction, _ = unit(x @ vectors[:, -1])
    return direction


class PhaseRodFlow(OptimizerModel):
    options: PhaseRodOptions = eqx.field(static=True)

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

    def one_step_map(self, h: Array) -> Array:
        """M = -(I + dF) (2, 2) on (alpha, beta) for a direction of preconditioned curvature h / lr: the
        rod's one-step map rho_{k+1} = -(rho_k + F_odd) linearized (F from :meth:`increment`, P = 1)."""
        one, zero = jnp.ones((1,), h.dtype), jnp.zeros((1,), h.dtype)
        columns = [self.increment(zero, h / self.lr * one, one), self.increment(one, zero, one)]
        jacobian = jnp.stack([jnp.concatenate(column) for column in columns], axis=1)
        return -(jnp.eye(2, dtype=h.dtype) + jacobian)

    def rod_plane(self, z: tuple[Phase, Rod]) -> RodPlane:
        """The rod's plane at the start of a step and its matched correction. The curvature along e is the
        secant over the rod's ends zeta_w +- s e, s = |e . rho_w| (at least :func:`~eosflow.flows.flow.probe_floor`,
        a finite difference): the rod's own effective curvature, so that an orbit (M(h) rho = rho) keeps
        its amplitude. Two gradients."""
        centre, rod = z
        p = self.moments.preconditioner(centre)
        e = rod_direction(rod.w, self.lr * rod.m / p)
        pe = p * e
        s = jnp.maximum(jnp.abs(jnp.vdot(e, rod.w)), probe_floor(centre.w))
        ends = jax.vmap(self.objective.grad)(jnp.stack([centre.w + s * e, centre.w - s * e]))
        secant = jnp.vdot(e, ends[0] - ends[1]) / (2.0 * s)
        curvature = secant / jnp.maximum(jnp.vdot(e, pe), jnp.finfo(p.dtype).tiny)
        correction = matched_correction(self.one_step_map(self.lr * curvature))
        return RodPlane(e, pe, jnp.where(jnp.vdot(e, e) > 0, correction, 0.0))

    def prepare(self, z: Any, measured: Measured, step: Array) -> tuple[Any, Any]:
        """The step's :class:`RodPlane` with ``rod_rate = "matched"`` and a momentum (without one m = g is
        no variable: M = [[h - 1, 0], [-h / lr, 0]] is singular and the rod stays first order)."""
        matched = self.options.rod_rate == "matched" and self.moments.rule.form != "none"
        return z, (self.rod_plane(z) if matched else None)

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
        rod_velocity = Rod(-odd_w - 2.0 * rod.w, -odd_m - 2.0 * rod.m)
        if setup is not None:  # on the plane: log M instead of M - I (rod_rate = "matched")
            alpha = jnp.vdot(setup.e, rod.w)
            beta = jnp.vdot(setup.pe, rod.m) / jnp.maximum(jnp.vdot(setup.pe, setup.pe), jnp.finfo(p.dtype).tiny)
            d_alpha, d_beta = setup.correction @ jnp.stack([alpha, beta])
            rod_velocity = Rod(rod_velocity.w + d_alpha * setup.e, rod_velocity.m + d_beta * setup.pe)
        velocity = (mo.velocity(centre, even, second, h), rod_velocity)
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
            **self.costs(aux, n, per_step_grads=2 * int(setup is not None)),
        }


register_models("rod_flow", PhaseRodFlow, PhaseRodOptions, "rod flow in (w, m) phase space, nu smooth")
