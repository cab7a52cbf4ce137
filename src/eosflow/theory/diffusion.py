"""Anomalous diffusion of SGD after convergence: displacements, the exponent fit, the theory curve.

    global displacement   Delta_k = ||theta_{k0 + k} - theta_{k0}||^2     (from a checkpoint k0)
    local displacement    delta_k = ||theta_{k+1} - theta_k||^2
    Delta_k ~ a k^c:  c = 1 Brownian, c < 1 sub-diffusive, c -> 2 ballistic (short lags)

The theory curve (a stationary start, a quadratic with independent modes) is
E Delta_k = sum_i 2 (P_i - [M_i(k) P_i])_{theta theta}, with P_i the mode's stationary covariance
and M_i(k) its propagator (T_i^k for SGD, expm(-A_i lr k) for the Langevin model). With a
power-law spectrum lambda_n ~ n^{-p} and Sigma_g ~ sigma^2 H, c ~ 1/p at intermediate lags
(derivation and the valid window: docs/sgd_limiting_dynamics.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from eosflow.theory.linear_regression import (
    continuous_system,
    discrete_stationary_covariance,
    discrete_system,
    matrix_powers,
    mode_variances,
    oscillator_propagator,
)

# ---- measured displacements ------------------------------------------------------------------


def global_displacement(params, start: int = 0) -> np.ndarray:
    """Delta_k = ||theta_{start + k} - theta_start||^2 for k = 0 .. n - start - 1."""
    params = np.asarray(params, float)
    return np.sum((params[start:] - params[start]) ** 2, axis=-1)


def local_displacement(params) -> np.ndarray:
    """delta_k = ||theta_{k+1} - theta_k||^2 for consecutive rows of ``params``."""
    return np.sum(np.diff(np.asarray(params, float), axis=0) ** 2, axis=-1)


def segment_displacements(params, segments: int) -> np.ndarray:
    """Delta from ``segments`` consecutive checkpoints: row b is the global displacement of
    segment b (rows b L .. (b+1) L - 1, L = n // segments) from its own first point."""
    params = np.asarray(params, float)
    length = len(params) // segments
    if length < 2:
        raise ValueError(f"{len(params)} saved positions cannot make {segments} segments of 2 or more")
    blocks = params[: segments * length].reshape(segments, length, -1)
    return np.sum((blocks - blocks[:, :1]) ** 2, axis=-1)


# ---- the exponent fit ------------------------------------------------------------------------


class ExponentFit(NamedTuple):
    """Delta ~ prefactor * lag^exponent on [window], with a two-sided ``level`` confidence interval."""

    exponent: float
    low: float
    high: float
    prefactor: float
    window: tuple[float, float]
    method: str


def _slope(log_lags: np.ndarray, log_values: np.ndarray) -> tuple[float, float, float]:
    """OLS slope, intercept and the slope's standard error."""
    import scipy.stats  # here, not at module level: it costs 0.6 s at import, paid by every process

    fit = scipy.stats.linregress(log_lags, log_values)
    return float(fit.slope), float(fit.intercept), float(fit.stderr)


def fit_exponent(
    lags, curves, window: tuple[float, float] | None = None, level: float = 0.95, points: int = 64
) -> ExponentFit:
    """Fit Delta ~ a lag^c by least squares of log Delta on log lag over ``window``.

    ``curves`` is one displacement curve (L,) or several (B, L): from consecutive checkpoints of
    one run (:func:`segment_displacements`), or from one checkpoint in B independent replicas (the
    honest interval for that checkpoint); ``window`` defaults to the last 2/3 of the lags. The fit uses
    up to ``points`` log-spaced lags, so every decade weighs the same.

    Interval: with B >= 2 curves, c is fitted to their mean and its standard error is the
    delete-one-curve jackknife's (t with B - 1 degrees of freedom). With one curve the OLS
    standard error is reported; it ignores the autocorrelation of a trajectory, so it is too narrow
    for measured data (method says which).
    """
    lags = np.asarray(lags, float)
    curves = np.atleast_2d(np.asarray(curves, float))
    lo, hi = window if window is not None else (lags[-1] / 3.0, lags[-1])
    inside = np.flatnonzero((lags >= lo) & (lags <= hi) & (lags > 0))
    if inside.size < 3:
        raise ValueError(f"the window [{lo:g}, {hi:g}] holds {inside.size} lags; a fit needs at least 3")
    chosen = np.unique(np.round(np.geomspace(1, inside.size, min(points, inside.size))).astype(int) - 1)
    idx = inside[chosen]
    x = np.log(lags[idx])

    def slope_of(curve):
        return _slope(x, np.log(np.maximum(curve[idx], np.finfo(float).tiny)))

    exponent, intercept, stderr = slope_of(curves.mean(axis=0))
    blocks = len(curves)
    if blocks >= 2:
        leave_one_out = np.array([slope_of(np.delete(curves, b, axis=0).mean(axis=0))[0] for b in range(blocks)])
        stderr = float(np.sqrt((blocks - 1) / blocks * np.sum((leave_one_out - leave_one_out.mean()) ** 2)))
        dof, method = blocks - 1, f"jackknife over {blocks} curves"
    else:
        dof, method = len(idx) - 2, "OLS on one curve (ignores autocorrelation)"
    import scipy.stats

    half = float(scipy.stats.t.ppf(0.5 + level / 2.0, dof)) * stderr
    return ExponentFit(
        exponent,
        exponent - half,
        exponent + half,
        float(np.exp(intercept)),
        (float(lags[idx[0]]), float(lags[idx[-1]])),
        method,
    )


# ---- theory ----------------------------------------------------------------------------------


def diffusion_curve(curvatures, noise, lr: float, momentum: float, steps, model: str = "discrete") -> np.ndarray:
    """E Delta_k from a stationary start, for modes of curvature h_i and per-step noise s2_i.

    ``model`` = "discrete" (SGD's exact recursion, M = T^k) or "continuous" (the Langevin model,
    M = expm(-A lr k)). Returns an array shaped like ``steps``.
    """
    h = np.asarray(curvatures, float)
    s2 = np.broadcast_to(np.asarray(noise, float), h.shape)
    steps = np.asarray(steps)
    if model == "discrete":
        transition, covariance = discrete_system(h[:, None, None], s2[:, None, None], lr, momentum)
        stationary = discrete_stationary_covariance(transition, covariance)
        correlated = (matrix_powers(transition, steps) @ stationary)[..., 0, 0]
        variance = stationary[:, 0, 0]
    elif model == "continuous":
        variance = mode_variances(h, s2, lr, momentum, "continuous").theta
        # C is diagonal per mode, so [M C]_{theta theta} = M_{theta theta} Var(theta)
        correlated = oscillator_propagator(h, lr, momentum, lr * steps)[..., 0, 0] * variance
    else:
        raise ValueError(f"model must be 'discrete' or 'continuous', got {model!r}")
    return np.sum(2.0 * (variance - correlated), axis=-1)


def predicted_local_displacement(noise_trace: float, lr: float, momentum: float) -> float:
    """delta_ss ~ lr^2 tr(Xi) / (1 - beta^2), Xi the per-step noise (tr Sigma_g / S for minibatches).

    The small-lr h limit of sum_i 2 lr^2 s2_i / ((1 - beta)(2 (1 + beta) - lr h_i)).
    """
    return lr**2 * noise_trace / (1.0 - momentum**2)


def mode_local_displacement(curvatures, noise, lr: float, momentum: float) -> float:
    """The exact stationary E delta = sum_i Var(step_i) of SGD on independent modes."""
    return float(np.sum(mode_variances(curvatures, noise, lr, momentum).step))


# ---- phase portraits -------------------------------------------------------------------------


def eigenplane_model(curvatures, projected_noise, lr: float, momentum: float):
    """(A, D) of the Langevin model restricted to k Hessian eigendirections.

    ``curvatures`` (k,) are h_i = lambda_i + lam; ``projected_noise`` is U^T Xi U (k x k). The
    restriction neglects the noise's coupling to the other directions (exact when Xi and H commute).
    """
    return continuous_system(np.diag(np.asarray(curvatures, float)), projected_noise, lr, momentum)
