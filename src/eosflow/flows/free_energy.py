"""The free-energy model: GD's centre theta coupled with the covariance Sigma of its oscillation.

GD at the edge of stability is written w_k = theta + (-1)^k delta_k with theta, delta slowly
varying and Sigma = <delta delta^T> of low rank, Sigma = V V^T, V = U diag(a) (U: r tracked Hessian
eigenvectors at theta, a: the oscillation's amplitudes along them). Averaging two GD steps gives
(docs/free_energy.md, eosflow's own derivation)

    dtheta/dt = -eta grad_theta F(theta, Sigma),
    F(theta, Sigma) = L(theta) + sum_j [ (L(theta + a_j u_j) + L(theta - a_j u_j)) / 2 - L(theta) ]
                    ~ L(theta) + 1/2 <Sigma, H(theta)>                    (the "taylor" stiffness)
    d log a_j / dt  = log | eta k_j(theta, a_j) - 1 |,
    k_j             = u_j . (g(theta + a_j u_j) - g(theta - a_j u_j)) / (2 a_j)   (secant stiffness)
                    ~ u_j^T H u_j                                          (the "taylor" stiffness)

so Sigma grows while the curvature *felt by the oscillation* exceeds 2/eta and decays below it;
with ``stiffness = "secant"`` a stable period-2 orbit of GD is an exact fixed point. The effective
free energy F is reported along the run (``free_energy`` = ``predicted_loss``).

Seeding: at t = 0, a_j = eta/2 |g . u_j|, the half-step rod: GD's first iterate sits eta/2 g away from
the midpoint its oscillation starts from. While eta S < 2 that seed decays like GD's period-2 mode,
|1 - eta S|^t, down to where GD's own mode sits: the rounding of every update reseeds it, so

    d(a_j^2)/dt = 2 log|eta k_j - 1| a_j^2 + (rounding * eps * rms(theta))^2,

and the time at which the oscillation regrows past eta S = 2 (GD's first loss spike) follows from
the machine precision, as it does for GD (``floor = false``, the default; ``rounding`` = 0.25, GD's
measured rounding per step; docs/free_energy.md). ``floor = true`` keeps a_j above the rod at every
step: right when large steps drive the oscillation (a catapult, as in deep matrix factorization),
too large a seed when GD sharpens slowly into the edge of stability.
Cost per substep: one gradient at theta plus two per oscillating direction (r "HVPs").

``implicit = true`` (the default) adds GD's implicit regularization to the centre's drift off the
oscillating subspace: a GD step of size eta is, to second order, a unit of time of the flow of
L + eta/4 |grad L|^2 (backward error analysis), so with P = I - U_r U_r^T

    dtheta/dt = -eta [grad F + eta/2 P H(theta) P grad F]        (one more HVP per substep).

The oscillating directions are left out: there GD's motion is the oscillation that Sigma models.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import SpecError, option
from eosflow.flows.flow import (
    Flow,
    Measured,
    centre_and_rod,
    padded,
    probe_floor,
    register_flow,
    value_and_grad_at,
)
from eosflow.flows.integrate import Growth, SubstepOptions, exact
from eosflow.objective import Objective


@dataclasses.dataclass(frozen=True)
class FreeEnergyOptions(SubstepOptions):
    rank: int = option(
        0, "r: oscillating directions, the rank of Sigma (0: every tracked eigenpair; else capped by them)", ge=0
    )
    stiffness: Literal["secant", "taylor"] = option(
        "secant",
        "secant: curvature averaged over the oscillation (exact on period-2 orbits); "
        "taylor: u^T H(theta) u and 1/2 <Sigma, H> (the second-order expansion)",
    )
    seed: Literal["rod", "none"] = option("rod", "rod: a_j = lr/2 |g . u_j| at t = 0; none: Sigma(0) = 0")
    floor: bool = option(
        False, "keep a_j >= lr/2 |g . u_j| at every step (a catapult: large steps keep re-seeding the oscillation)"
    )
    seed_scale: float = option(1.0, "multiplies the seed and the floor", gt=0)
    rounding: float = option(
        0.25,
        "source of GD's period-2 mode: a_j^2 gains (rounding * eps * rms(theta))^2 per step "
        "(0.25: a float32 GD step's measured rounding; 0: none)",
        ge=0,
    )
    implicit: bool = option(
        True,
        "add GD's implicit regularization off the oscillating subspace: theta's drift "
        "-eta grad F gains -eta^2/2 P H P grad F, P = I - U U^T (one more HVP per substep)",
    )

    def check(self, where: str) -> None:
        super().check(where)
        if self.seed == "none" and self.floor:
            raise SpecError(f"`{where}.floor` = true needs `{where}.seed` = 'rod' (got 'none')")


class OrbitAverage(NamedTuple):
    """The oscillation-averaged loss, its gradient in theta and the felt stiffness k_j."""

    free_energy: Array
    drift: Array
    stiffness: Array
    loss: Array
    grad: Array


def rod_amplitudes(grad: Array, vectors: Array, lr: float) -> Array:
    """The half-step rod's extent along each direction: eta/2 |g . u_j|."""
    return 0.5 * lr * jnp.abs(vectors.T @ grad)


def transport(amplitudes: Array, old: Array, new: Array) -> Array:
    """diag(U_new^T Sigma U_new)^(1/2) for Sigma = U_old diag(a^2) U_old^T (new tracked basis)."""
    overlap = new.T @ old
    return jnp.sqrt((overlap**2) @ amplitudes**2)


def averaged_loss(
    objective: Objective, w: Array, vectors: Array, amplitudes: Array, mode: str, measured: Measured | None = None
) -> OrbitAverage:
    """F(theta, Sigma), grad_theta F and the stiffness felt along each direction (see module doc); (L, g) at
    theta are the ``measured`` ones at its position (:func:`~eosflow.flows.flow.value_and_grad_at`).

    secant: the two-point average over theta +- a_j u_j. To keep the secant accurate for tiny a_j
    it is measured at the probe b_j = max(a_j, sqrt(eps)(1 + |theta|_inf)) and the (quadratic)
    corrections to L and g are rescaled by (a_j / b_j)^2.
    """
    loss, grad = value_and_grad_at(objective, measured)(w)
    if mode == "taylor":

        def along(u):
            hu = objective.hvp(w, u)
            return u @ hu, objective.third_derivative(w, u, u)

        curvature, cubic = jax.vmap(along, in_axes=1)(vectors)
        weights = amplitudes**2
        return OrbitAverage(loss + 0.5 * weights @ curvature, grad + 0.5 * weights @ cubic, curvature, loss, grad)
    probes = jnp.maximum(amplitudes, probe_floor(w))

    def ends(u, b):
        (lp, gp), (lm, gm) = objective.value_and_grad(w + b * u), objective.value_and_grad(w - b * u)
        return 0.5 * (lp + lm) - loss, 0.5 * (gp + gm) - grad, u @ (gp - gm) / (2.0 * b)

    extra_loss, extra_grad, stiffness = jax.vmap(ends, in_axes=(1, 0))(vectors, probes)
    weights = (amplitudes / probes) ** 2
    return OrbitAverage(loss + weights @ extra_loss, grad + weights @ extra_grad, stiffness, loss, grad)


class FreeEnergyPoint(NamedTuple):
    """The model's variables (and, with :class:`Growth` amplitudes, their velocity)."""

    centre: Array  # theta
    amplitudes: Array  # a (k_max,): RMS oscillation along U's columns (zero beyond the rank)


class Oscillation(NamedTuple):
    """The directions of this step's oscillation."""

    vectors: Array  # U (d, k): tracked Hessian eigenvectors at theta
    active: Array  # (k,) the first r directions
    rank: int
    measured: Measured | None = None  # the step's measurement, with (L, g) at theta (None: evaluated)


def off_oscillation(v: Array, oscillation: Oscillation) -> Array:
    """P v = v - U_r U_r^T v: v without its components along the r oscillating directions."""
    vectors = jnp.where(oscillation.active, oscillation.vectors, 0.0)
    return v - vectors @ (vectors.T @ v)


class FreeEnergyFlow(Flow):
    options: FreeEnergyOptions = eqx.field(static=True)

    def start(self, w0: Array) -> FreeEnergyPoint:
        """theta = w0 and no oscillation yet (seeded at the first step, see the module doc)."""
        return FreeEnergyPoint(w0, jnp.zeros((self.spectrum.k_max,), w0.dtype))

    def anchor(self, window) -> FreeEnergyPoint:
        """GD's iterates at k-2 .. k+2 as theta + (-1)^k delta: theta = the centre c_k and a_j = |u_j . r_k|, the
        rod r_k = (-1)^k (w_k - c_k) along GD's tracked vectors u_j there (the basis ``prepare`` carries from)."""
        centre, rod = centre_and_rod(window)
        amplitudes = jnp.abs(window[2].vectors.T @ rod)
        return FreeEnergyPoint(centre, padded(amplitudes, self.spectrum.k_max))

    def prepare(self, z: FreeEnergyPoint, measured: Measured, step: Array) -> tuple[FreeEnergyPoint, Oscillation]:
        """The amplitudes carried to the new basis (d x k), seeded at t = 0 and floored at the rod."""
        (w, amplitudes), options, vectors = z, self.options, measured.vectors
        k = vectors.shape[1]
        rank = k if options.rank == 0 else min(options.rank, k)
        active = jnp.arange(k) < rank
        amplitudes = jnp.where(active, transport(amplitudes[:k], measured.previous, vectors), 0.0)
        grad = value_and_grad_at(self.objective, measured)(w)[1]
        seed = options.seed_scale * jnp.where(active, rod_amplitudes(grad, vectors, self.lr), 0.0)
        if options.seed == "rod":
            amplitudes = jnp.where(step == 0, seed, amplitudes)
        if options.floor:
            amplitudes = jnp.maximum(amplitudes, seed)
        return FreeEnergyPoint(w, amplitudes), Oscillation(vectors, active, rank, measured)

    def term(self, oscillation: Oscillation, n: Array | int):
        return lambda z: self.field(z, oscillation)

    def field(  # type: ignore[override]  # more arguments than Flow.field: term() binds them
        self, z: FreeEnergyPoint, oscillation: Oscillation
    ) -> tuple[FreeEnergyPoint, OrbitAverage]:
        """(dtheta/dt, d log a/dt with the rounding source of a^2) = (-eta grad F, log|eta k - 1|, s^2)."""
        w, amplitudes = z
        averaged = averaged_loss(
            self.objective, w, oscillation.vectors, amplitudes, self.options.stiffness, oscillation.measured
        )
        growth = jnp.log(jnp.maximum(jnp.abs(self.lr * averaged.stiffness - 1.0), 1e-12))
        eps = jnp.finfo(w.dtype).eps
        source = jnp.where(oscillation.active, self.options.rounding * eps * jnp.sqrt(jnp.mean(w**2)), 0.0)
        # a velocity: its amplitudes leaf is a Growth rate (see integrate.exact)
        drift = averaged.drift
        if self.options.implicit:
            drift = drift + 0.5 * self.lr * off_oscillation(
                self.objective.hvp(w, off_oscillation(drift, oscillation)), oscillation
            )
        velocity = FreeEnergyPoint(-self.lr * drift, Growth(growth, source**2))  # type: ignore[arg-type]
        return velocity, averaged

    def update(self, field, z, h, key):
        return exact(field, z, h)

    def finish(self, z: FreeEnergyPoint, end: FreeEnergyPoint, start: OrbitAverage, step: Array) -> FreeEnergyPoint:
        return end._replace(amplitudes=padded(end.amplitudes, self.spectrum.k_max))

    def observe(self, z, start: OrbitAverage, oscillation: Oscillation, n: Array | int) -> dict[str, Array]:
        amplitudes, rank = z[1], oscillation.rank
        top = jnp.argmax(amplitudes)
        secant = self.options.stiffness == "secant"
        return {
            "loss": start.loss,
            "grad_norm": jnp.linalg.norm(start.grad),
            "predicted_loss": start.free_energy,
            "free_energy": start.free_energy,
            "covariance": padded(jnp.sort(amplitudes**2)[::-1], self.spectrum.k_max),
            "amplitude": amplitudes[top],
            "top_vector": oscillation.vectors[:, top],
            "felt_sharpness": start.stiffness[0],
            "substeps": n,
            # the seed's and the first substep's (L, g) at theta are the measurement's (one gradient, counted)
            "grads": n * (1 + 2 * rank if secant else 1),
            "hvps": (0 if secant else 2 * n * rank) + (n if self.options.implicit else 0),
        }


register_flow(
    "free_energy",
    FreeEnergyFlow,
    FreeEnergyOptions,
    "free-energy model: centre theta and oscillation covariance Sigma with its own dynamics",
    every_step=True,
)
