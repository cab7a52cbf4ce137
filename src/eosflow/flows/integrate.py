"""One integrator for every flow: z(t + 1) from z(t) in n substeps of length h = 1/n.

The Diffrax split between the *term* (what the model says) and the *solver* (how it is stepped):

    field(z) -> (dz/dt, aux)                     a model's vector field on its variables z (a pytree)
    update(field, z, h, key) -> (z', aux)        one substep of length h; aux is the field's at z
    integrate(field, z, n, update, key) -> (z(t + 1), aux at z(t))

Time is measured in optimizer steps: one unit of time is one step of the modelled optimizer, so
h = 1/n. The aux of the first evaluation describes the state at the start of the step, which is
what a process's row reports (no second evaluation for the observation); an aux leaf wrapped in
:class:`Averaged` is reported as its mean over the step's substeps instead. ``n`` may be a traced
integer (the substep count chosen from the measured sharpness inside a jitted step), except
with a key, where it must be a Python int (one key per substep, ``jax.random.split(key, n)``).

Updates (solvers):

- :func:`euler`: z + h v.
- :func:`rk4`: the classical fourth-order Runge-Kutta step (four field evaluations).
- :func:`exact`: Euler, except on the leaves whose velocity is a :class:`Growth` (a rate
  d log z/dt), which are stepped exactly: z e^(h rate) (or, with a source s,
  (z^2 e^(2 h rate) + h s)^(1/2), the RMS amplitude whose square gains s per unit of time).
- stochastic updates take the substep's key (e.g. :mod:`eosflow.flows.langevin`'s BAOAB and
  Euler-Maruyama); a model may also write its own (:mod:`eosflow.flows.edge` renormalizes its
  direction after an exact step).

The substep count: :func:`substep_count` is the one rule, n = clip(ceil(eta * stiffness / courant),
substeps, max_substeps), configured by :class:`SubstepOptions` (dt * eta * S <= courant for the
stiffest mode; the reference code's max(4, ceil(2 eta S)) is courant = 0.5, substeps = 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import SpecError, option

Field = Callable[[Any], tuple[Any, Any]]  # z -> (dz/dt, aux)


class Update(Protocol):
    def __call__(self, field: Any, z: Any, h: Any, key: Array | None) -> tuple[Any, Any]: ...


class Growth(NamedTuple):
    """A velocity given as a growth rate, d log z/dt = rate (z >= 0), with an optional source:
    d(z^2)/dt = 2 rate z^2 + source. :func:`exact` steps it exactly in the rate."""

    rate: Array
    source: Array | None = None


class Averaged(NamedTuple):
    """An aux node that :func:`integrate` reports as its mean over the substeps (a left Riemann sum of
    the unit of time), not as its value at z(t): e.g. a multiplier that spikes on the first substep."""

    value: Any


def _is_averaged(node: Any) -> bool:
    return isinstance(node, Averaged)


def integrate(
    field: Any, z: Any, n: int | Array, update: Update | None = None, key: Array | None = None
) -> tuple[Any, Any]:
    """One unit of time in ``n`` substeps of ``update`` (default :func:`euler`) of length 1/n.

    Returns z(t + 1) and the aux of the field at z(t), its :class:`Averaged` nodes replaced by their
    mean over the n substeps. With a ``key``, substep i gets ``jax.random.split(key, n)[i]`` (n a
    Python int); without, the update gets ``None``.
    """
    update = euler if update is None else update
    h = 1.0 / n
    keys = None if key is None else jax.random.split(key, int(n))  # with a key, n is a Python int (see above)

    def averaged(aux):  # the values of aux's Averaged nodes, in order
        return [node.value for node in jax.tree_util.tree_leaves(aux, is_leaf=_is_averaged) if _is_averaged(node)]

    def substep(i, carry):
        z, first, total = carry
        z, aux = update(field, z, h, None if keys is None else keys[i])
        first = jax.tree_util.tree_map(lambda kept, new: jnp.where(i == 0, new, kept), first, aux)
        return z, first, jax.tree_util.tree_map(jnp.add, total, averaged(aux))

    # every substep in one loop body, so the field is compiled once (not once more for the first
    # substep, whose aux is kept; eval_shape only traces it for that aux's shapes); n >= 1 always
    aux_shape = jax.eval_shape(lambda z: update(field, z, h, None if keys is None else keys[0])[1], z)
    blank = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), aux_shape)
    end, first, total = jax.lax.fori_loop(0, n, substep, (z, blank, averaged(blank)))
    if not total:
        return end, first
    means = iter(jax.tree_util.tree_map(lambda s: s / n, total))
    return end, jax.tree_util.tree_map(
        lambda node: Averaged(next(means)) if _is_averaged(node) else node, first, is_leaf=_is_averaged
    )


def euler(field: Field, z: Any, h: Any, key: Array | None = None) -> tuple[Any, Any]:
    """z + h v(z)."""
    velocity, aux = field(z)
    return jax.tree_util.tree_map(lambda x, v: x + h * v, z, velocity), aux


def rk4(field: Field, z: Any, h: Any, key: Array | None = None) -> tuple[Any, Any]:
    """z + h/6 (k1 + 2 k2 + 2 k3 + k4), the classical Runge-Kutta step."""

    def shifted(scale, k):
        return jax.tree_util.tree_map(lambda x, v: x + scale * h * v, z, k)

    k1, aux = field(z)
    k2 = field(shifted(0.5, k1))[0]
    k3 = field(shifted(0.5, k2))[0]
    k4 = field(shifted(1.0, k3))[0]
    combined = jax.tree_util.tree_map(
        lambda x, a, b, c, d: x + h / 6.0 * (a + 2.0 * b + 2.0 * c + d), z, k1, k2, k3, k4
    )
    return combined, aux


def exact(field: Field, z: Any, h: Any, key: Array | None = None) -> tuple[Any, Any]:
    """Euler on plain velocities; a :class:`Growth` leaf is stepped exactly (see the module doc)."""
    velocity, aux = field(z)

    def step(v, x):
        if not isinstance(v, Growth):
            return x + h * v
        if v.source is None:
            return x * jnp.exp(h * v.rate)
        return jnp.sqrt(x**2 * jnp.exp(2.0 * h * v.rate) + h * v.source)

    return jax.tree_util.tree_map(step, velocity, z, is_leaf=lambda v: isinstance(v, Growth)), aux


UPDATES: dict[str, Update] = {"euler": euler, "rk4": rk4, "exact": exact}
STAGES = {"euler": 1, "rk4": 4, "exact": 1}  # field evaluations per substep


@dataclasses.dataclass(frozen=True)
class SubstepOptions:
    substeps: int = option(4, "fewest substeps per unit of time (one GD step)", ge=1)
    courant: float = option(0.5, "largest eta * S * dt of one substep: more substeps when S is large", gt=0)
    max_substeps: int = option(64, "most substeps per unit of time", ge=1)

    def check(self, where: str) -> None:
        if self.substeps > self.max_substeps:
            raise SpecError(
                f"`{where}.substeps` = {self.substeps} exceeds `{where}.max_substeps` = {self.max_substeps}"
            )


def substep_count(lr: float, stiffness: Array, options: SubstepOptions) -> Array:
    """n = clip(ceil(eta * stiffness / courant), substeps, max_substeps); ``substeps`` if unknown."""
    n = jnp.ceil(lr * stiffness / options.courant)
    n = jnp.where(jnp.isfinite(n), n, options.substeps)
    return jnp.clip(n, options.substeps, options.max_substeps).astype(jnp.int32)
