"""Rod flow: consecutive GD iterates as the two ends of a rod (eosflow's continuous model).

Derived in docs/rod_flow.md from the rod picture of Regis & Chewi (2026); the equations are
eosflow's own. GD is modelled as w_k = x(k) + (-1)^k r(k) with a smooth centre x and a rod
half-vector r whose dynamics do not depend on its sign. With the even and odd parts of the
gradient over the ends,

    E(x, r) = [g(x + r) + g(x - r)] / 2,        O(x, r) = [g(x + r) - g(x - r)] / 2,

    dx/dt = -eta E - c eta^2 Hbar E,     Hbar = [H(x + r) + H(x - r)] / 2,   c = (1 - 1/n) / 2
    dr/dt =  eta O - 2 r

integrated by n explicit Euler substeps per unit time (c compensates Euler's own first-order
error, so the discrete scheme is second-order consistent with GD below the edge of stability).
After each unit of time the rod absorbs (-1)^k tau_k, the part of GD's step the smooth centre
did not take (tau_k = x(k+1) - x(k) + eta E): this is what seeds the oscillation, as in GD. Along
the rod itself only the fraction h^2/(h^2 + |r|^2), h = (eta/2)|E| GD's smooth half-step, is absorbed:
an established oscillation evolves by the flow alone, whose fixed points are GD's period-2 orbits.
Explicit: two gradients (and two HVPs for the correction, or two more gradients with
``curvature = "lookahead"``) per substep, no eigensolver. With ``curvature = "secant"`` the correction
comes from the change of the centre's velocity over the last substep, v_i - v_(i-1) = h (F'F)_x + O(h^2)
(a two-step method, two gradients per substep; docs/rod_flow.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.flows.flow import Flow, Measured, centre_and_rod, register_flow
from eosflow.flows.integrate import euler
from eosflow.objective import Objective


class Ends(NamedTuple):
    """The loss and gradient over a rod's two ends x +- m u, and the centre's velocity."""

    mean_loss: Array  # [L(x + m u) + L(x - m u)] / 2: the predicted time-averaged loss
    mean_grad: Array  # E = [g(x + m u) + g(x - m u)] / 2 = grad of the symmetrized loss
    odd_part: Array  # O = [g(x + m u) - g(x - m u)] / 2
    sharpness_along: Array  # u . O / m: the curvature along u averaged over the rod
    centre_velocity: Array  # -eta E - c eta^2 Hbar E


def correction_coefficient(substeps: int, correction: bool) -> float:
    """c in dx/dt = -eta E - c eta^2 Hbar E: GD's 1/2 minus Euler's own h/2 (h = 1/substeps)."""
    return 0.5 * (1.0 - 1.0 / substeps) if correction else 0.0


def resolvable_length(centre: Array) -> Array:
    """The shortest rod whose ends' gradients resolve the curvature along it: sqrt(eps)(1 + |x|_inf)."""
    return jnp.finfo(centre.dtype).eps ** 0.5 * (1.0 + jnp.max(jnp.abs(centre)))


def rod_ends(
    objective: Objective,
    centre: Array,
    direction: Array,
    length: Array,
    lr: float,
    coefficient: float,
    curvature: str = "hvp",
) -> Ends:
    """Two gradients at x +- m u; with c > 0 also Hbar E, by ``curvature``: ``"hvp"``, two HVPs (one
    linearization of the ends), or ``"lookahead"``, two gradients at the ends moved by c eta E:
    eta mean_+- g(x +- m u + c eta E) = eta E + c eta^2 Hbar E + O(eta^3 |E|^2 D^3L).

    A rod shorter than :func:`resolvable_length` l is evaluated at x +- l u and its odd part
    scaled by m / l (O is linear in m up to O(m^3)), so that tiny rods keep an accurate direction.
    """
    reach = jnp.maximum(length, resolvable_length(centre)) * direction

    def at_ends(x):
        return jax.vmap(objective.value_and_grad)(jnp.stack([x + reach, x - reach]))

    if coefficient and curvature == "lookahead":
        losses, grads = at_ends(centre)
        mean_grad = jnp.mean(grads, axis=0)
        _, ahead = at_ends(centre + coefficient * lr * mean_grad)
        velocity = -lr * jnp.mean(ahead, axis=0)
    elif coefficient:
        (losses, grads), linear = jax.linearize(at_ends, centre)
        mean_grad = jnp.mean(grads, axis=0)
        _, curvature_along = linear(mean_grad)  # (H(x + m u) E, H(x - m u) E)
        velocity = -lr * mean_grad - coefficient * lr**2 * jnp.mean(curvature_along, axis=0)
    else:
        losses, grads = at_ends(centre)
        mean_grad = jnp.mean(grads, axis=0)
        velocity = -lr * mean_grad
    odd = 0.5 * (grads[0] - grads[1])
    span = jnp.linalg.norm(reach)
    sharpness = jnp.vdot(direction, odd) / jnp.where(span > 0, span, 1.0)
    return Ends(jnp.mean(losses), mean_grad, odd * (length / jnp.where(span > 0, span, 1.0)), sharpness, velocity)


def unit(vector: Array) -> tuple[Array, Array]:
    """(vector / |vector|, |vector|), with the zero vector mapped to itself."""
    length = jnp.linalg.norm(vector)
    return vector / jnp.where(length > 0, length, 1.0), length


def parity_kick(state_step: Array, centre: Array, new_centre: Array, ends: Ends, lr: float) -> Array:
    """(-1)^k tau_k, tau_k = x(k+1) - [x(k) - eta E]: what the smooth centre leaves undone of the
    lifted GD step, which GD's rod absorbs with the parity of the step (docs/rod_flow.md)."""
    parity = 1 - 2 * (state_step % 2)
    return parity * (new_centre - (centre - lr * ends.mean_grad))


def along_rod_kick(direction: Array, length: Array, kick: Array, ends: Ends, lr: float) -> Array:
    """The part of the kick's component a = u . k along a rod m u that the rod absorbs: a h^2 / (h^2 + m^2).

    h = (eta/2)|E| is GD's smooth half-step. A rod shorter than h (no oscillation yet, or a seed) takes
    the whole kick, as GD's does; a rod longer than h is GD's oscillation, and along it the centre-rod
    coupling is the flow's own: feeding it the map's as well, with alternating sign, made GD's period-2
    orbits unstable (period-4 cycles, docs/rod_flow.md section 5). Linear in a, so alternating kicks
    of a smooth tau still cancel."""
    half_step = 0.5 * lr * jnp.linalg.norm(ends.mean_grad)
    denominator = half_step**2 + length**2
    fraction = jnp.where(denominator > 0, half_step**2 / jnp.where(denominator > 0, denominator, 1.0), 1.0)
    return fraction * jnp.vdot(direction, kick)


def rod_field(objective: Objective, lr: float, coefficient: float = 0.0, curvature: str = "hvp"):
    """z = (x, r) -> ((dx/dt, dr/dt), Ends) with dx/dt = -eta E - c eta^2 Hbar E, dr/dt = eta O - 2 r.

    With c = 0 this is also the mean-field particle model in flat coordinates (docs/meanfield.md).
    """

    def field(z: tuple[Array, Array]) -> tuple[tuple[Array, Array], Ends]:
        centre, rod = z
        ends = rod_ends(objective, centre, *unit(rod), lr, coefficient, curvature)
        return (ends.centre_velocity, lr * ends.odd_part - 2.0 * rod), ends

    return field


def oscillation_row(
    objective: Objective, centre: Array, ends: Ends, lr: float, direction: Array, magnitude: Array
) -> dict[str, Array]:
    """The predictions shared by rod-like models, for a rod x +- m u (see docs/rod_flow.md)."""
    half_step = 0.5 * lr * jnp.linalg.norm(ends.mean_grad)
    return {
        "loss": objective.value(centre),
        "predicted_loss": ends.mean_loss,
        "amplitude": magnitude,
        "half_length": jnp.sqrt(magnitude**2 + half_step**2),
        "top_vector": direction,
        "sharpness_along": ends.sharpness_along,
        "grad_norm": jnp.linalg.norm(ends.mean_grad),
    }


@dataclasses.dataclass(frozen=True)
class RodFlowOptions:
    substeps: int = option(4, "explicit Euler substeps per unit time (GD step)", ge=1)
    correction: bool = option(True, "first backward-error correction of the centre (2 HVPs per substep)")
    curvature: Literal["hvp", "lookahead", "secant"] = option(
        "hvp",
        "the correction's Hbar E by two HVPs, by two gradients at the ends moved by c lr E (same order), or "
        "(secant, rod_flow) from the change of the centre's velocity over the last substep (no evaluation)",
    )


class RodModel(Flow):
    """What the rod-like models share: a fixed substep count and the corrected centre."""

    options: RodFlowOptions = eqx.field(static=True)

    @property
    def coefficient(self) -> float:
        return correction_coefficient(self.options.substeps, self.options.correction)

    def substeps(self, measured: Measured, setup: Any) -> int:
        return self.options.substeps

    @property
    def secant(self) -> bool:
        """The correction taken from the last substep's velocity by :meth:`RodFlow.update`, not in the field."""
        return bool(self.coefficient) and self.options.curvature == "secant"

    @property
    def field_coefficient(self) -> float:
        """c as the field applies it: 0 with ``secant`` (the update applies it)."""
        return 0.0 if self.secant else self.coefficient

    def ends(self, centre: Array, direction: Array, length: Array) -> Ends:
        """The rod x +- m u evaluated, with the centre's corrected velocity (uncorrected with ``secant``)."""
        return rod_ends(
            self.objective, centre, direction, length, self.lr, self.field_coefficient, self.options.curvature
        )

    def cost(self, n: Array | int, hvps_per_substep: int = 0) -> dict[str, Array]:
        """Two gradients per substep, and for the correction two HVPs, (lookahead) two gradients more or
        (secant) nothing."""
        corrected = int(bool(self.coefficient))
        lookahead = corrected * int(self.options.curvature == "lookahead")
        by_hvps = corrected * int(self.options.curvature == "hvp")
        hvps = n * (hvps_per_substep + 2 * by_hvps)
        return {"grads": jnp.asarray((2 + 2 * lookahead) * n, jnp.int32), "hvps": jnp.asarray(hvps, jnp.int32)}


class RodFlow(RodModel):
    """Centre and sign-free rod; see the module docstring for the vector field.

    z = (x (d,), r (d,)), and with ``curvature = "secant"`` also v (d,), the centre's uncorrected velocity
    -eta E at the last substep (NaN before the first: that substep is Euler's)."""

    def start(self, w0: Array) -> tuple[Array, ...]:
        """Centre at w0 and no rod: w_0 = x(0) exactly; the first step's kick seeds the rod."""
        return (w0, jnp.zeros_like(w0), *self.no_velocity(w0))

    def no_velocity(self, w: Array) -> tuple[Array, ...]:
        """The secant's last velocity before any substep (NaN), or nothing."""
        return (jnp.full_like(w, jnp.nan),) if self.secant else ()

    def anchor(self, window) -> tuple[Array, ...]:
        """Centre c_k and rod r_k = (-1)^k (w_k - c_k) of GD's iterates at k-2 .. k+2 (``window``)."""
        centre, rod = centre_and_rod(window)
        return (centre, rod, *self.no_velocity(centre))

    def field(self, z: tuple[Array, ...]) -> tuple[tuple[Array, Array], Ends]:
        """(dx/dt, dr/dt) = (-eta E - c eta^2 Hbar E, eta O - 2 r) (with ``secant``: -eta E, the correction
        being :meth:`update`'s)."""
        return rod_field(self.objective, self.lr, self.field_coefficient, self.options.curvature)(z[:2])

    def update(self, field, z, h, key) -> tuple[tuple[Array, ...], Ends]:
        """Euler; with ``secant``, x + h v_i - c (v_i - v_(i-1)): the change of the velocity v = -eta E over the
        last substep is h (F'F)_x + O(h^2), F'F the field's derivative along itself, whose first term is the
        correction's eta^2 Hbar E (docs/rod_flow.md, section 4)."""
        if not self.secant:
            return euler(field, z, h, key)
        (velocity, rod_velocity), ends = field(z)
        last = jnp.where(jnp.isnan(z[2]), velocity, z[2])
        centre = z[0] + h * velocity - self.coefficient * (velocity - last)
        return (centre, z[1] + h * rod_velocity, velocity), ends

    def finish(self, z, end, ends: Ends, step: Array) -> tuple[Array, ...]:
        """The rod absorbs the parity kick (-1)^k tau_k: across the rod whole, along it only while the
        rod is shorter than GD's half-step (:func:`along_rod_kick`)."""
        centre, rod = end[:2]
        kick = parity_kick(step, z[0], centre, ends, self.lr)
        direction, length = unit(rod)
        along = along_rod_kick(direction, length, kick, ends, self.lr)
        return (centre, rod + kick + (along - jnp.vdot(direction, kick)) * direction, *end[2:])

    def observe(self, z, ends: Ends, measured: Measured, n: Array | int) -> dict[str, Array]:
        direction, length = unit(z[1])
        return {**oscillation_row(self.objective, z[0], ends, self.lr, direction, length), **self.cost(n)}


register_flow("rod_flow", RodFlow, RodFlowOptions, "rod flow: centre + sign-free rod between consecutive GD iterates")
