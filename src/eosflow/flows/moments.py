"""The continuous moments of an update rule, and the process that runs any model built on them.

An optimizer of :mod:`eosflow.optim.adaptive` steps w_{k+1} = w_k - lr D_{k+1} / P(nu_{k+1}); its
direction D and second moment nu are linear filters of the gradients (docs/adaptive.md):

    D_{k+1} = kappa g_k - kappa L (g_k - g_{k-1}) + ...     nu_{k+1} = s_k - L2 (s_k - s_{k-1}) + ...

with the lags L = 0 (no momentum), b/(1-b) (EMA and classical), b^2/(1-b) (Nesterov), L2 = b2/(1-b2),
kappa = 1 (EMA, none) or 1/(1-b) (classical, Nesterov), s = g^2 or ||g||^2. The models carry
the phase point z = (w, D, nu), time in steps:

    dw/dt = -lr D / P(nu),    dD/dt = c (kappa g - D),    dnu/dt = c2 (s(g) - nu),

with c = 1 / (1/2 + L) and c2 = 1 / (1/2 + L2) = 2 (1 - b2) / (1 + b2) ("lag" rates: the average of
D over [k, k+1] has the discrete D_{k+1}'s lag, so the w-increments agree to O(lr^2) per step; for
GD, c = 2 gives GD's modified equation dw/dt = -lr g - lr^2 H g / 2). Integrated by Euler substeps
of length h, the rates are 1 / (L + 1/2 - h/2), which compensates the substeps' own lag. The
initial D(0) = (1 - L c) D* and nu(0) = (1 - L2 c2) s put the slow mode where the discrete
filters started at zero put it. A bias-corrected moment is divided by its mass q, the same filter
applied to the constant 1 (dq/dt = c (1 - q), from the same start): the continuous 1 - b^k.
``moments = "reference"`` is the central-flow reference code's convention instead (RMSProp only):
D = g, dnu/dt = ((1 - b2)/b2) (s - nu), nu(0) = nu_1 = (1 - b2) s(g_0).

:class:`OptimizerModel` is what every model of these optimizers adds to
:class:`~eosflow.flows.flow.Flow` (the one process wrapper, on the one integrator): the
preconditioned eigenpairs at the centre, the substep count from their stiffness, and a vector field
``field(z, setup, h) -> (velocity, aux)`` that reads the Euler substep length h.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.config import SpecError, option
from eosflow.flows.flow import Flow, Measured, centred, measured_value, register_flow, value_and_grad_at
from eosflow.flows.integrate import STAGES, UPDATES, SubstepOptions, substep_count
from eosflow.optim.adaptive import OPTIMIZERS, OptimizerState, UpdateRule, preconditioned_row
from eosflow.preconditioning import diagonal_preconditioner

Moments = Literal["lag", "reference"]


@dataclasses.dataclass(frozen=True)
class MomentFlowOptions(SubstepOptions):
    moments: Moments = option(
        "lag",
        "lag: dD/dt = c (kappa g - D), dnu/dt = c2 (s - nu) with lag-matched rates c = 1/(1/2 + L) "
        "(second order below the edge); reference: the central-flow code's dnu/dt = ((1-b2)/b2)(s - nu), "
        "nu(0) = nu_1 (RMSProp only)",
    )
    start: Literal["extrapolated", "lag"] = option(
        "extrapolated",
        "extrapolated: a bias-corrected moment starts at the gradient extrapolated back along the flow "
        "(one HVP at w0), so the first steps match the optimizer's to O(lr^3), and an uncorrected nu where its "
        "transient moves w as far as the optimizer's; lag: the linear lag-matched start (the old one)",
    )
    method: Literal["euler", "rk4"] = option(
        "rk4",
        "integrator of each substep: rk4 (the rates uncompensated), or euler (rates compensated for the "
        "substep's lag; its count keeps substeps > lr * lambda_P * kappa, beyond which momentum's modes grow)",
    )


class Phase(NamedTuple):
    w: Array  # (d,) parameters (a model's centre)
    direction: Array  # (d,) D, what lr / P multiplies
    nu: Array  # (d,) second moment, () for the scalar form and without one
    mass: Array  # (2,) q1, q2: the filters of D and nu applied to the constant 1 (bias correction: D/q1, nu/q2)


@dataclasses.dataclass(frozen=True)
class ContinuousMoments:
    """The continuous-time moments of ``rule`` (module docstring)."""

    rule: UpdateRule
    lr: float
    moments: Moments = "lag"

    def check(self, where: str) -> None:
        if self.moments == "reference":
            if self.rule.form != "none":
                raise SpecError(
                    f"`{where}.moments` = 'reference' is the central-flow code's convention for "
                    "RMSProp; use 'lag' with momentum"
                )
            if self.rule.bias_correction or self.rule.beta2 == 0.0:
                raise SpecError(f"`{where}.moments` = 'reference' needs beta2 > 0 and no bias correction")

    @property
    def kappa(self) -> float:
        return 1.0 / (1.0 - self.rule.beta1) if self.rule.form in ("classical", "nesterov") else 1.0

    @property
    def lag(self) -> float:
        b = self.rule.beta1
        return {"none": 0.0, "ema": b / (1 - b), "classical": b / (1 - b), "nesterov": b * b / (1 - b)}[self.rule.form]

    def direction_rate(self, h: Array | float = 0.0) -> Array | float:
        """c = 1 / (L + 1/2 - h/2): the lag-matched rate, compensated for Euler substeps of length h
        (Euler's multiplier (1 + h lambda)^(1/h) = exp(lambda - h lambda^2 / 2 + ...) adds h/2 to the lag)."""
        return 1.0 / (self.lag + 0.5 - 0.5 * h)

    def nu_rate(self, h: Array | float = 0.0) -> Array | float:
        """c2 = 1 / (L2 + 1/2 - h/2), L2 = b2 / (1 - b2); the reference code's (1 - b2) / b2."""
        b2 = self.rule.beta2
        return (1.0 - b2) / b2 if self.moments == "reference" else 1.0 / (b2 / (1.0 - b2) + 0.5 - 0.5 * h)

    def second(self, grad: Array) -> Array:
        """s(g): g^2 (diagonal) or ||g||^2 (scalar); 0 without a second moment."""
        if self.rule.second_moment == "diagonal":
            return grad**2
        return jnp.sum(grad**2) if self.rule.second_moment == "scalar" else jnp.zeros((), grad.dtype)

    @property
    def corrects(self) -> tuple[bool, bool]:
        """Whether D and nu are bias-corrected (D only in the EMA form, as Adam's m)."""
        r = self.rule
        return (r.bias_correction and r.form == "ema", r.bias_correction and r.second_moment != "none")

    def initial(
        self, w0: Array, grad: Array, h: Array | float, trend: Array | None = None, matched: bool = True
    ) -> Phase:
        """z(0): D(0) = (1 - L c) D*, nu(0) = (1 - L2 c2) s, which puts the slow mode at the discrete
        filters' (started from zero) to O(lr^2) (c D*/2 and c2 s/2 as h -> 0). A bias-corrected moment
        carries its mass q (the same filter of the constant 1, from the same start) and divides by it,
        as the discrete 1 - b^k does. With ``trend`` = dg/dt at t = 0, a bias-corrected moment starts
        at the gradient extrapolated back by its :meth:`lookback` alpha: D(0) = q1 kappa (g - alpha1 trend),
        nu(0) = q2 s(g - alpha2 trend) (docs/adaptive.md, "The start of a bias-corrected moment")."""
        start_d = 1.0 - self.lag * self.direction_rate(h)
        b2 = self.rule.beta2
        start_nu = 1.0 - b2 / (1.0 - b2) * self.nu_rate(h) if self.rule.second_moment != "none" else 1.0
        if self.moments == "reference":
            start_nu = 1.0 - self.rule.beta2
        mass = jnp.asarray([start_d if self.corrects[0] else 1.0, start_nu if self.corrects[1] else 1.0], w0.dtype)
        grad_d = grad_nu = grad
        if trend is not None and self.corrects[0]:
            grad_d = grad - lookback(float(self.direction_rate(h)), float(start_d)) * trend
        if trend is not None and self.corrects[1]:
            grad_nu = grad - lookback(float(self.nu_rate(h)), float(start_nu)) * trend
        nu = start_nu * self.second(grad_nu)
        uncorrected = self.rule.second_moment != "none" and not self.corrects[1] and self.rule.beta2 > 0
        if matched and self.moments == "lag" and uncorrected:
            nu = self.matched_nu(self.second(grad), float(start_d), h)
        return Phase(w0, start_d * self.kappa * grad_d, nu, mass)

    def matched_nu(self, second: Array, start_d: float, h: Array | float) -> Array:
        """nu(0) of an uncorrected second moment (ours): the start r s (per coordinate, s = s(g0)) whose transient
        moves w as far as the optimizer's does, int_0^inf (D/P(nu) - D*/P(s)) dt = sum_k (D_{k+1}/P(nu_{k+1}) -
        D*/P(s)) with g frozen. The linear start (1 - L2 c2) s matches int (nu - s) dt only: P is not linear in
        nu, and the transient lasts ~1/(1 - b2) steps whatever lr is, so the flow was first order in lr
        (docs/adaptive.md section 3, "The start of an uncorrected nu")."""
        rule = self.rule
        b1 = rule.beta1 if rule.form == "ema" else 0.0  # D_{k+1} / D* = 1 - b1^(k+1): Adam's m; D = g otherwise
        rates = (float(self.direction_rate(h)), float(self.nu_rate(h)))
        r = _matched_fraction(second, b1, rule.beta2, rule.eps, rule.eps_root, rates, start_d)
        return jnp.where(second > 0, r, 1.0) * second

    def anchored(self, window: Sequence[OptimizerState]) -> Phase:
        """z at the optimizer's step k from its states at k-2 .. k+2 (``window``; state j holds w_j, m_j, nu_j):
        w = the centre c_k = (w_{k-1} + 2 w_k + w_{k+1}) / 4, D = the mean of the centred discrete directions
        at k and k+1 (D averaged over [k, k+1] is the discrete D_{k+1}: the lag-matched start), nu = (nu_k +
        nu_{k+1}) / 2 (nu_{k+1} with the reference moments, whose nu(0) is nu_1), q = the mean of 1 - b^k and
        1 - b^(k+1) for a bias-corrected moment. The centring cancels a period-2 oscillation and keeps a
        linear trend (docs/adaptive.md, "Starting on the optimizer's state")."""
        w = [s.w for s in window]
        directions = [self.discrete_direction(window[j].rule, window[j - 1].rule) for j in range(1, 5)]
        k, dtype = window[2].rule.count, w[2].dtype  # the moments' count: the step, from w0; not from a checkpoint
        nu = window[3].rule.nu if self.moments == "reference" else 0.5 * (window[2].rule.nu + window[3].rule.nu)

        def mass(b: float, corrected: bool) -> Array:
            return 1.0 - 0.5 * b**k * (1.0 + b) if corrected else jnp.ones((), dtype)

        q = jnp.stack([mass(self.rule.beta1, self.corrects[0]), mass(self.rule.beta2, self.corrects[1])])
        direction = 0.5 * (centred(directions, 1) + centred(directions, 2))  # c_k(D) and c_{k+1}(D)
        return Phase(centred(w), direction, nu, q.astype(dtype))

    def discrete_direction(self, state: Any, previous: Any) -> Array:
        """The discrete D_j before bias correction, from the rule states at j and j - 1: m_j, or
        g_{j-1} + b m_j = (1 + b) m_j - b m_{j-1} for Nesterov."""
        if self.rule.form == "nesterov":
            return (1.0 + self.rule.beta1) * state.m - self.rule.beta1 * previous.m
        return state.m

    def preconditioner(self, z: Phase) -> Array:
        """P = sqrt(nu / q2 + eps_root) + eps (d,); ones without a second moment."""
        r = self.rule
        if r.second_moment == "none":
            return jnp.ones_like(z.w)
        return jnp.broadcast_to(diagonal_preconditioner(z.nu, r.eps, r.eps_root, z.mass[1]), z.w.shape)

    def preconditioner_slopes(self, z: Phase) -> tuple[Array, Array]:
        """(dP/dnu, dP/dq2) (d,) (the scalar form's broadcast; 0 where nu/q2 + eps_root = 0, a coordinate
        whose gradient has always been 0)."""
        inside = z.nu / z.mass[1] + self.rule.eps_root
        half = jnp.where(inside > 0, 0.5 / jnp.sqrt(jnp.where(inside > 0, inside, 1.0)), 0.0)
        return (
            jnp.broadcast_to(half / z.mass[1], z.w.shape),
            jnp.broadcast_to(-half * z.nu / z.mass[1] ** 2, z.w.shape),
        )

    def mass_velocity(self, z: Phase, h: Array | float) -> Array:
        """dq/dt = c (1 - q) for each bias-corrected moment (0 otherwise)."""
        rates = jnp.asarray(
            [self.direction_rate(h) if self.corrects[0] else 0.0, self.nu_rate(h) if self.corrects[1] else 0.0],
            z.w.dtype,
        )
        return rates * (1.0 - z.mass)

    def velocity(self, z: Phase, grad: Array, second: Array, h: Array | float) -> Phase:
        """(dw/dt, dD/dt, dnu/dt) given the gradient and s(g) driving the moments (linear in both), for
        Euler substeps of length h."""
        p = self.preconditioner(z)
        nu_dot = self.nu_rate(h) * (second - z.nu)
        mass = self.mass_velocity(z, h)
        if self.moments == "reference":
            return Phase(-self.lr * grad / p, jnp.zeros_like(z.direction), nu_dot, mass)
        d_dot = self.direction_rate(h) * (self.kappa * grad - z.direction)
        return Phase(-self.lr * z.direction / (z.mass[0] * p), d_dot, nu_dot, mass)

    def modulus(self, preconditioned_sharpness: Array) -> Array:
        """The largest rate of the linearized (w, D) field on a direction with h = lr lambda_P: the roots of
        s^2 + c s + c kappa h = 0 are at most max(c, sqrt(c kappa h)) in modulus (h itself for D = g)."""
        h = self.lr * jnp.maximum(preconditioned_sharpness, 0.0)
        if self.moments == "reference":
            return h
        c = self.direction_rate()
        return jnp.maximum(c, jnp.sqrt(c * self.kappa * h))

    def euler_rate(self, preconditioned_sharpness: Array) -> Array:
        """max(|s|, kappa h): dt times it <= courant < 1 keeps Euler accurate and stable, |1 + dt s|^2 =
        1 - c dt + c kappa h dt^2 < 1 iff dt kappa h < 1 on the lightly damped rotations of momentum."""
        h = self.lr * jnp.maximum(preconditioned_sharpness, 0.0)
        return jnp.maximum(self.modulus(preconditioned_sharpness), self.kappa * h)

    def stiffness(self, preconditioned_sharpness: Array, method: str = "euler") -> Array:
        """The rate that sets the substep count: :meth:`modulus` (RK4, stable for |dt s| < 2.8) or
        :meth:`euler_rate` (Euler), plus 2 (the rod's own decay)."""
        rate = self.euler_rate if method == "euler" else self.modulus
        return rate(preconditioned_sharpness) + 2.0


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _matched_fraction(
    second: Array, b1: float, b2: float, eps: float, eps_root: float, rates: tuple[float, float], start_d: float
) -> Array:
    """r (shaped as s) with int_0^inf (D/P(r s e-folding to s) - D*/P(s)) dt = sum_k (D_{k+1}/P(nu_{k+1}) - D*/P(s)):
    the optimizer's sum over its steps (those beyond b^k < 1e-7 in closed form, geometric), the flow's integral by
    Gauss-Legendre in x = sqrt(nu / s), r by bisection (the flow's excess falls as r grows)."""
    c, c2 = rates

    def excess(a: Array | float, fraction: Array | float, s: Array) -> Array:
        """a / P(fraction s) - 1 / P(s): a step's excess over the settled one, per lr D*."""
        step, settled = (jnp.asarray(diagonal_preconditioner(nu, eps, eps_root, 1.0)) for nu in (fraction * s, s))
        return a / step - 1.0 / settled

    slow = max(b2, b1)
    count = int(np.ceil(np.log(1e-7) / np.log(slow)))

    def term(k, total):
        k = k.astype(second.dtype)
        return total + excess(1.0 - b1 ** (k + 1.0), 1.0 - b2 ** (k + 1.0), second)

    total = jax.lax.fori_loop(0, count, term, jnp.zeros_like(second))
    total = total + excess(1.0 - b1**count, 1.0 - b2**count, second) * slow / (1.0 - slow)
    nodes, weights = (jnp.asarray(a, second.dtype) for a in np.polynomial.legendre.leggauss(64))

    def flow_excess(r: Array) -> Array:
        """int_0^inf of the flow's excess from nu(0) = r s, in x = sqrt(nu / s) from sqrt(r) to 1:
        e^{-c2 t} = (1 - x^2) / (1 - r), dt = 2 x dx / (c2 (1 - x^2)) (a smooth integrand)."""
        low = jnp.sqrt(r)[..., None]
        x = low + (1.0 - low) * 0.5 * (nodes + 1.0)  # (..., nodes)
        decay = (1.0 - x**2) / (1.0 - r[..., None])
        a = 1.0 - (1.0 - start_d) * decay ** (c / c2)
        density = excess(a, x**2, second[..., None]) * 2.0 * x / (c2 * (1.0 - x**2))
        return 0.5 * (1.0 - low[..., 0]) * jnp.sum(weights * density, axis=-1)

    def halve(_, bracket):
        low, high = bracket
        middle = 0.5 * (low + high)
        above = flow_excess(middle) > total
        return jnp.where(above, middle, low), jnp.where(above, high, middle)

    low, high = jax.lax.fori_loop(0, 60, halve, (jnp.zeros_like(second), jnp.full_like(second, 1.0 - 1e-12)))
    return 0.5 * (low + high)


def lookback(rate: float, start_mass: float) -> float:
    """alpha such that y = D/q, the bias-corrected output of dD/dt = c (g - D), dq/dt = c (1 - q) from
    D(0) = q0 (g0 - alpha g'), q(0) = q0, averages to g0 over [0, 1] for g = g0 + t g': the discrete moment
    of the first step is g0 exactly. alpha = int_0^1 (t - (1 - e^{-ct})/c) / q dt / int_0^1 q0 e^{-ct} / q dt
    with q(t) = 1 - (1 - q0) e^{-ct}: 0.319 at b = 0.5, 0.260 at 0.9, 0.251 at 0.99 (1/4 as b -> 1: the
    uniform average over [-1/2, 0])."""
    nodes, weights = np.polynomial.legendre.leggauss(24)
    t, weights = 0.5 * (nodes + 1.0), 0.5 * weights
    decay = np.exp(-rate * t)
    mass = 1.0 - (1.0 - start_mass) * decay
    return float(np.sum(weights * (t - (1.0 - decay) / rate) / mass) / np.sum(weights * start_mass * decay / mass))


class OptimizerModel(Flow):
    """A continuous model of an optimizer on :class:`~eosflow.flows.flow.Flow`: its eigenpairs are
    those of P^{-1/2} H P^{-1/2} at the centre, its substep count follows from their stiffness, and its
    vector field ``field(z, setup, h)`` reads the substep length h (the lag-matched rates do).
    The field's aux carries ``cost``, the evaluations per substep."""

    moments: ContinuousMoments = eqx.field(static=True)
    options: MomentFlowOptions = eqx.field(static=True)

    def centre(self, z: Any) -> Phase:
        return z

    def position(self, z: Any) -> Array:
        return self.centre(z).w

    def measure(self, z: Any, vectors: Array, step: Array) -> tuple[Array, dict[str, Array], Array, Any]:
        """The eigenpairs of P^-1/2 H P^-1/2 at the centre (P from its nu) and (L, g) there (:func:`measured_value`)."""
        p = self.moments.preconditioner(self.centre(z))
        value, pairs = measured_value(self.objective, self.position(z), vectors, step, self.spectrum, p)
        row = preconditioned_row(pairs, self.moments.rule.threshold(self.lr), self.spectrum)
        return pairs.vectors, row, row["preconditioned_sharpness"], value

    def compensated(self, n: Array | int) -> Array | float:
        """The substep length the lag-matched rates compensate: 1/n for Euler, 0 for RK4 (whose own
        error is O(h^4))."""
        return 1.0 / n if self.options.method == "euler" else 0.0

    def start_phase(self, w0: Array) -> Phase:
        """The phase point at t = 0 (:meth:`ContinuousMoments.initial`); with ``start = "extrapolated"``
        its bias-corrected moments start at the gradient extrapolated back along the initial velocity v,
        trend = H(w0) v (one HVP)."""
        mo, h = self.moments, self.compensated(self.options.substeps)
        grad = self.objective.grad(w0)
        start = mo.initial(w0, grad, h, matched=self.options.start != "lag")
        if self.options.start == "lag" or not any(mo.corrects):
            return start
        velocity = mo.velocity(start, grad, mo.second(grad), h).w
        return mo.initial(w0, grad, h, self.objective.hvp(w0, velocity))

    def anchor(self, window: Sequence[OptimizerState]) -> Any:
        """The model's variables at the optimizer's step k, from its states at k-2 .. k+2: the phase point
        of :meth:`ContinuousMoments.anchored` (models with more variables add theirs)."""
        return self.moments.anchored(window)

    def stable_velocity(
        self, z: Phase, h: Array | float, measured: Measured | None = None
    ) -> tuple[Phase, Array, Array]:
        """(dz/dt of the stable flow, L, g) at z, for substeps of length h (one gradient; none at the
        ``measured`` position, :func:`~eosflow.flows.flow.value_and_grad_at`)."""
        loss, grad = value_and_grad_at(self.objective, measured)(z.w)
        return self.moments.velocity(z, grad, self.moments.second(grad), h), loss, grad

    def update(self, field: Any, z: Any, h: Any, key: Array | None) -> tuple[Any, Any]:
        return UPDATES[self.options.method](field, z, h, key)

    def substeps(self, measured: Measured, setup: Any) -> Array:
        return substep_count(1.0, self.moments.stiffness(measured.sharpness, self.options.method), self.options)

    def field(self, z: Any, setup: Any, h: Array | float) -> tuple[Any, dict]:  # type: ignore[override]
        raise NotImplementedError

    def term(self, setup: Any, n: Array | int) -> Any:
        h = self.compensated(n)
        return lambda z: self.field(z, setup, h)

    def costs(self, aux: dict, n: Array | int, per_step_grads: Array | int = 0) -> dict[str, Array]:
        """The row's evaluation counts: n times the field's per-substep ``cost`` (plus ``per_step_grads``
        made once per step), and the substeps."""
        cost = aux["cost"]
        evaluations = n * STAGES[self.options.method]
        grads = evaluations * cost.get("grads", 1) + per_step_grads
        counts = {"substeps": n, "grads": grads, "hvps": evaluations * cost.get("hvps", 0)}
        if "third_derivatives" in cost:
            counts["third_derivatives"] = evaluations * cost["third_derivatives"]
        return counts

    def growth_threshold(self) -> float:
        return 0.5 * self.spectrum.threshold * self.moments.rule.threshold(self.lr)


def register_models(
    kind: str, cls: type[OptimizerModel], options: type, summary: str, optimizers=tuple(OPTIMIZERS)
) -> None:
    """Register ``<optimizer>_<kind>`` for each optimizer, whose ``[optimizer]`` table holds the
    hyperparameters the model shares with it."""
    for optimizer in optimizers:
        name = f"{optimizer}_{kind}"

        def fields(problem, spec, parsed, name=name, optimizer=optimizer) -> dict:
            moments = ContinuousMoments(spec.options[optimizer].rule(), spec.lr, parsed.moments)
            moments.check(name)
            return {"moments": moments}

        register_flow(
            name,
            cls,
            options,
            f"{summary} of {optimizer} ([{optimizer}] holds its hyperparameters)",
            fields=fields,
            optimizer=optimizer,
        )
