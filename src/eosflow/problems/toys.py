"""Toy objectives with known edge-of-stability behaviour: quadratics, quartic potentials, sharp valleys.

The 2-D members (``quartic`` with dim = 2, ``sharp_valley`` with one transverse direction,
``quadratic`` with two eigenvalues) are meant for phase-plane pictures.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eosflow.config import SpecError, option
from eosflow.objective import Objective
from eosflow.problems.registry import Problem, register_problem


@dataclasses.dataclass(frozen=True)
class QuadraticParams:
    eigenvalues: tuple[float, ...] = option((20.0, 10.0, 1.0), "the Hessian's spectrum")
    rotate: bool = option(True, "use a random orthonormal eigenbasis (else the coordinate axes)")
    init_scale: float = option(1.0, "norm of the random initial point", gt=0)


@register_problem("quadratic", QuadraticParams, "L(w) = 1/2 w^T H w with a given spectrum")
def quadratic(params: QuadraticParams, seed: int, dtype) -> Problem:
    if not params.eigenvalues:
        raise SpecError("`problem.eigenvalues` must list at least one eigenvalue")
    rng = np.random.default_rng(seed)
    d = len(params.eigenvalues)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0] if params.rotate else np.eye(d)
    hessian = jnp.asarray(basis @ np.diag(params.eigenvalues) @ basis.T, dtype=dtype)
    objective = Objective.from_function(_Quadratic(hessian))
    direction = rng.standard_normal(d)
    w0 = jnp.asarray(params.init_scale * direction / np.linalg.norm(direction), dtype=dtype)
    return Problem(objective, w0, info={"dimension": d})


class _Quadratic(eqx.Module):
    hessian: jax.Array

    def __call__(self, w):
        return 0.5 * w @ (self.hessian @ w)


@dataclasses.dataclass(frozen=True)
class QuarticParams:
    sharpness: float = option(30.0, "S, the curvature at the origin", gt=0)
    quartic: float = option(1.0, "Q, the strength of the quartic softening", gt=0)
    dim: int = option(1, "dimension n (the potential is radial)", ge=1)
    init: float = option(0.1, "|w0|: a small displacement from the unstable origin", gt=0)


@register_problem(
    "quartic",
    QuarticParams,
    "L(w) = (S/2)|w|^2 - (Q/4)|w|^4: GD settles on a period-2 orbit for 2 < lr*S < 3",
)
def quartic(params: QuarticParams, seed: int, dtype) -> Problem:
    objective = Objective.from_function(_Quartic(params.sharpness, params.quartic))
    direction = np.random.default_rng(seed).standard_normal(params.dim)
    w0 = jnp.asarray(params.init * direction / np.linalg.norm(direction), dtype=dtype)
    return Problem(objective, w0, info={"dimension": params.dim})


class _Quartic(eqx.Module):
    sharpness: float
    quartic: float

    def __call__(self, w):
        r2 = jnp.sum(w**2)
        return 0.5 * self.sharpness * r2 - 0.25 * self.quartic * r2**2


# ---- sharp valleys: f = g + eps * h --------------------------------------------------------------
PROFILES = {
    "exp": lambda x, rate: jnp.exp(rate * x),  # sharpness grows (rate > 0) along +x
    "quadratic": lambda x, rate: 1.0 + rate * x**2,  # flattest at x = 0
}
DRIFTS = {
    "linear": lambda x, target: -x,  # a constant push towards +x
    "quadratic": lambda x, target: 0.5 * (x - target) ** 2,  # a pull towards x = target
}


@dataclasses.dataclass(frozen=True)
class SharpValleyParams:
    profile: Literal["exp", "quadratic"] = option(
        "exp", "sharpness along the valley: exp: s(x) = S e^{rate x}; quadratic: s(x) = S (1 + rate x^2)"
    )
    sharpness: float = option(5.0, "S, the valley's sharpness at x = 0", gt=0)
    rate: float = option(1.0, "how fast the sharpness changes along the valley")
    bend: float = option(
        1.0, "curvature of the valley floor y = bend x^2 / 2 (0: straight, whose floor is invariant under GD)"
    )
    transverse: tuple[float, ...] = option(
        (1.0,), "relative sharpness r_j of each transverse direction (dimension = 1 + their number)"
    )
    drift: Literal["linear", "quadratic"] = option(
        "linear", "h along the valley: linear: h = -x; quadratic: h = (x - target)^2 / 2"
    )
    eps: float = option(0.02, "eps, the strength of the drift h", ge=0)
    target: float = option(0.0, "the minimum of the quadratic drift")
    x0: float = option(0.0, "initial position along the valley")
    y0: float = option(0.1, "initial offset from the valley floor (every transverse coordinate)")

    def check(self, where: str) -> None:
        if not self.transverse or min(self.transverse) <= 0:
            raise SpecError(f"`{where}.transverse` = {list(self.transverse)} must list positive relative sharpnesses")
        if self.profile == "quadratic" and self.rate < 0:
            raise SpecError(f"`{where}.rate` = {self.rate} must be >= 0 for the quadratic profile (s(x) > 0)")


class SharpValley(eqx.Module):
    """f(x, y) = 1/2 s(x) sum_j r_j (y_j - c(x))^2 + eps h(x),  c(x) = bend x^2 / 2.

    On the floor y = c(x) the valley's Hessian is s(x) sum_j r_j v_j v_j^T with v_j = e_j - c'(x) e_x;
    with one transverse direction its sharpness is r s(x) (1 + c'(x)^2), plus eps h''(x) along x.
    """

    transverse: jax.Array
    sharpness: float
    rate: float
    bend: float
    eps: float
    target: float
    profile: str = eqx.field(static=True)
    drift: str = eqx.field(static=True)

    def valley_sharpness(self, x):
        """s(x), the sharpness profile along the valley."""
        return self.sharpness * PROFILES[self.profile](x, self.rate)

    def __call__(self, w):
        x, y = w[0], w[1:]
        floor = 0.5 * self.bend * x**2
        valley = 0.5 * self.valley_sharpness(x) * jnp.sum(self.transverse * (y - floor) ** 2)
        return valley + self.eps * DRIFTS[self.drift](x, self.target)


@register_problem(
    "sharp_valley",
    SharpValleyParams,
    "f = g + eps h: a valley whose sharpness s(x) varies along it, and a drift h along it (2-D by default)",
)
def sharp_valley(params: SharpValleyParams, seed: int, dtype) -> Problem:
    fn = SharpValley(
        jnp.asarray(params.transverse, dtype),
        params.sharpness,
        params.rate,
        params.bend,
        params.eps,
        params.target,
        params.profile,
        params.drift,
    )
    start = [params.x0] + [0.5 * params.bend * params.x0**2 + params.y0] * len(params.transverse)
    return Problem(Objective.from_function(fn), jnp.asarray(start, dtype), info={"dimension": len(start)})
