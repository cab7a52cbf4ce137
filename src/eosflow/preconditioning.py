"""Preconditioned sharpness and each optimizer's edge-of-stability threshold.

An optimizer that steps w <- w - lr P^{-1} m, with m a momentum of the gradient and P a positive
diagonal preconditioner frozen over a few steps, is stable on a quadratic with Hessian H iff
every eigenvalue a of the *preconditioned Hessian* P^{-1/2} H P^{-1/2} (similar to P^{-1} H)
satisfies lr * a < c, where c depends on the momentum only (derivation: docs/adaptive.md):

    no momentum (GD, RMSProp)                      c = 2
    heavy ball, classical  w+ = w - lr g + b (w - w-)  c = 2 (1 + b)
    heavy ball, EMA        m+ = b m + (1 - b) g; w+ = w - lr m+   c = 2 (1 + b) / (1 - b)   (Adam: 38 at b = 0.9)
    Nesterov, classical    w+ = y - lr g(y); y+ = w+ + b (w+ - w)   c = 2 (1 + b) / (1 + 2 b)

``edge_threshold`` returns c / lr, the value the preconditioned sharpness hovers at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

MomentumForm = Literal["classical", "ema", "nesterov"]
MOMENTUM_FORMS: tuple[str, ...] = ("classical", "ema", "nesterov")


def stability_constant(momentum: float = 0.0, form: MomentumForm = "classical") -> float:
    """c such that the linearized iteration is stable iff lr * a < c (a: preconditioned curvature). ``momentum`` may
    be an array (an injected hyperparameter): a traced one (inside jit) is not range-checked."""
    try:
        value: float | None = float(momentum)
    except TypeError:  # traced: jax's ConcretizationTypeError is a TypeError
        value = None
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if form == "classical":
        return 2.0 * (1.0 + momentum)
    if form == "ema":
        return 2.0 * (1.0 + momentum) / (1.0 - momentum)
    if form == "nesterov":
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    raise ValueError(f"unknown momentum form {form!r}; expected one of {', '.join(MOMENTUM_FORMS)}")


def edge_threshold(lr: float, momentum: float = 0.0, form: MomentumForm = "classical") -> float:
    """The preconditioned sharpness at the edge of stability: c / lr (2/lr for GD and RMSProp)."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    return stability_constant(momentum, form) / lr


def decoupled_decay_factor(decay: Any) -> Any:
    """1 - delta/2: the edge of EMA momentum with decoupled weight decay, w+ = (1 - delta) w - lr P^-1 m+.

    On an eigenvector of P^{-1/2} H P^{-1/2} (eigenvalue a, h = lr a) the iteration on (w, m) has
    trace 1 + b - delta - (1 - b) h and determinant b (1 - delta); a multiplier reaches -1 at
    (1 - b) h = (1 + b) (2 - delta), so c becomes c (1 - delta/2) (delta = lr * weight_decay).
    """
    return 1.0 - 0.5 * decay


def diagonal_preconditioner(
    nu: Float[Array | np.ndarray, " d"], eps: float = 0.0, eps_root: float = 0.0, bias_correction: Array | float = 1.0
) -> Float[Array | np.ndarray, " d"]:
    """P = sqrt(nu / bias_correction + eps_root) + eps, the diagonal of RMSProp / Adam's denominator.

    ``bias_correction`` is 1 - beta2^t for Adam (1 for RMSProp); ``eps_root`` is the epsilon
    inside the square root (optax's ``eps_root``, or RMSProp's ``eps_in_sqrt`` epsilon). A NumPy ``nu`` (a torch
    optimizer's state) gives NumPy in its dtype: through jnp, float64 would become float32 unless x64 is on.
    """
    sqrt = np.sqrt if isinstance(nu, np.ndarray) else jnp.sqrt
    return sqrt(nu / bias_correction + eps_root) + eps


def preconditioned_matvec(
    matvec: Callable[[Float[Array, "d k"]], Float[Array, "d k"]], preconditioner: Float[Array, " d"]
) -> Callable[[Float[Array, "d k"]], Float[Array, "d k"]]:
    """V -> P^{-1/2} H P^{-1/2} V for a block matvec V -> H V (d x k) and P's diagonal (d,).

    Its eigenvalues are those of P^{-1} H; an eigenvector u of it gives P^{-1/2} u of P^{-1} H.
    """
    scale = 1.0 / jnp.sqrt(preconditioner)[:, None]
    return lambda vectors: scale * matvec(scale * vectors)
