"""Exact phase-space dynamics of SGD on a quadratic loss (linear regression) and of its Langevin model.

Notation: curvature K = H + lam I (Hessian plus weight decay), per-step gradient noise covariance
Xi = Cov(g_B - g) (= Sigma_g / S for minibatches of S examples drawn with replacement), learning
rate lr, momentum beta. Coordinates are centred at the minimizer of L(w) + lam/2 |w|^2.

Discrete (SGD, PyTorch momentum), per step, on z = (theta, b):

    z_{k+1} = T z_k + e_k,   T = [[I - lr K, -lr beta I], [K, beta I]],
    Cov(e_k) = Q = [[lr^2 Xi, -lr Xi], [-lr Xi, Xi]]                    (e_k = (-lr xi_k, xi_k))

Continuous (underdamped Langevin, physical time t = lr * step), on x = (theta, v = dtheta/dt):

    dx = -A x dt + sqrt(2 D) dW,   A = [[0, -I], [K / m, 2 gamma I]],   2 D = [[0, 0], [0, lr Xi / m^2]]
    m = lr (1 + beta) / 2,   gamma = (1 - beta) / (2 m),   omega^2 = K / m.

Stationary covariances solve Lyapunov equations (A C + C A^T = 2 D; P = T P T^T + Q); moments
from any Gaussian start are  mean(t) = M(t) mean0,  cov(t) = C - M C M^T + M cov0 M^T  with
M = expm(-A t) or T^k. The modified loss is Psi(x) = 1/2 x^T C^{-1} x (p_ss ~ exp(-Psi)) and the
stationary probability current is J = -Q_c C^{-1} x p_ss with Q_c = A C - D antisymmetric.
The derivations (and the per-mode closed forms) are in docs/sgd_limiting_dynamics.md.

Every function accepts a single system (d x d blocks) or a stack of small ones (..., d, d): the
per-mode (1 x 1) form is what the diffusion curves of large spectra use.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

# ---- the model's constants ---------------------------------------------------------------


def mass(lr: float, momentum: float) -> float:
    """m = lr (1 + beta) / 2, the inertia of the Langevin model."""
    return lr * (1.0 + momentum) / 2.0


def friction(lr: float, momentum: float) -> float:
    """gamma = (1 - beta) / (lr (1 + beta)): theta'' + 2 gamma theta' + omega^2 theta = noise."""
    return (1.0 - momentum) / (lr * (1.0 + momentum))


def frequency(curvature, lr: float, momentum: float):
    """omega = sqrt(2 h / (lr (1 + beta))) of each mode of curvature h (oscillates when omega > gamma)."""
    return np.sqrt(2.0 * np.asarray(curvature) / (lr * (1.0 + momentum)))


def continuous_correction(curvature, lr: float, momentum: float):
    """Discrete / continuous stationary variance of a mode: 1 / (1 - lr h / (2 (1 + beta)))."""
    return 1.0 / (1.0 - lr * np.asarray(curvature) / (2.0 * (1.0 + momentum)))


# ---- per-mode closed forms ---------------------------------------------------------------


class ModeVariances(NamedTuple):
    """Stationary variances of one mode (curvature h, noise variance s2 per step)."""

    theta: np.ndarray  # Var(theta)
    step: np.ndarray  # Var(theta_{k+1} - theta_k)
    velocity: np.ndarray  # Var(v), v = dtheta/dt (continuous) or -b (discrete)


def mode_variances(curvature, noise, lr: float, momentum: float, model: str = "discrete") -> ModeVariances:
    """Closed forms; discrete (exact for SGD, from its AR(2) form, stable iff 0 < lr h < 2 (1 + beta)):

        Var(theta) = lr s2 (1 + beta) / (h (1 - beta) (2 (1 + beta) - lr h))
        Var(step)  = 2 lr^2 s2 / ((1 - beta) (2 (1 + beta) - lr h)),    Var(b) = Var(step) / lr^2

    continuous (Langevin): Var(theta) = lr s2 / (2 (1 - beta) h), Var(v) = omega^2 Var(theta),
    and the step is lr v.
    """
    h, s2, beta = np.asarray(curvature, float), np.asarray(noise, float), momentum
    if model == "discrete":
        gap = 2.0 * (1.0 + beta) - lr * h
        theta = lr * s2 * (1.0 + beta) / (h * (1.0 - beta) * gap)
        step = 2.0 * lr**2 * s2 / ((1.0 - beta) * gap)
        return ModeVariances(theta, step, step / lr**2)
    if model == "continuous":
        theta = lr * s2 / (2.0 * (1.0 - beta) * h)
        velocity = frequency(h, lr, beta) ** 2 * theta
        return ModeVariances(theta, lr**2 * velocity, velocity)
    raise ValueError(f"model must be 'discrete' or 'continuous', got {model!r}")


def oscillator_propagator(curvature, lr: float, momentum: float, times) -> np.ndarray:
    """M(t) = expm(-A t) of each mode in closed form, shape (*times.shape, *curvature.shape, 2, 2).

    With Omega = sqrt(omega^2 - gamma^2) (imaginary when overdamped) and S = sin(Omega t) / Omega:
    M = e^{-gamma t} [[C + gamma S, S], [-omega^2 S, C - gamma S]], C = cos(Omega t). The damped
    terms are evaluated as exponentials e^{(-gamma +- i Omega) t} (no overflow when overdamped),
    and through sinc when |Omega t| < 1 (exact at critical damping).
    """
    h = np.asarray(curvature, float)
    t = np.asarray(times, float).reshape(np.shape(times) + (1,) * h.ndim)
    gamma, omega2 = friction(lr, momentum), frequency(h, lr, momentum) ** 2
    big_omega = np.sqrt((omega2 - gamma**2).astype(complex))
    rising, falling = np.exp((-gamma + 1j * big_omega) * t), np.exp((-gamma - 1j * big_omega) * t)
    small = np.abs(big_omega * t) < 1.0
    with np.errstate(all="ignore"):
        near = np.exp(-gamma * t) * t * np.sinc(np.where(small, big_omega * t, 0.0) / np.pi)
        far = (rising - falling) / (2j * np.where(small, 1.0, big_omega))
    sin_over = np.where(small, near, far).real
    cos = ((rising + falling) / 2.0).real
    rows = [[cos + gamma * sin_over, sin_over], [-omega2 * sin_over, cos - gamma * sin_over]]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


# ---- the linear systems ------------------------------------------------------------------


def _blocks(top_left, top_right, bottom_left, bottom_right) -> np.ndarray:
    """[[a, b], [c, d]] from (..., d, d) blocks, broadcasting leading axes."""
    parts = np.broadcast_arrays(top_left, top_right, bottom_left, bottom_right)
    return np.concatenate([np.concatenate(parts[:2], axis=-1), np.concatenate(parts[2:], axis=-1)], axis=-2)


def _as_matrices(curvature, noise) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = np.asarray(curvature, float)
    xi = np.broadcast_to(np.asarray(noise, float), k.shape)
    return k, xi, np.broadcast_to(np.eye(k.shape[-1]), k.shape)


def continuous_system(curvature, noise, lr: float, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, D) of the Langevin model dx = -A x dt + sqrt(2D) dW on x = (theta, v)."""
    k, xi, eye = _as_matrices(curvature, noise)
    m = mass(lr, momentum)
    zero = np.zeros_like(k)
    drift = _blocks(zero, -eye, k / m, 2.0 * friction(lr, momentum) * eye)
    diffusion = _blocks(zero, zero, zero, lr * xi / (2.0 * m**2))
    return drift, diffusion


def discrete_system(curvature, noise, lr: float, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, Q) of SGD's exact recursion z_{k+1} = T z_k + e_k on z = (theta, b)."""
    k, xi, eye = _as_matrices(curvature, noise)
    transition = _blocks(eye - lr * k, -lr * momentum * eye, k, momentum * eye)
    covariance = _blocks(lr**2 * xi, -lr * xi, -lr * xi, xi)
    return transition, covariance


def _kron_solve(operator: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    n = rhs.shape[-1]
    flat = np.linalg.solve(operator, rhs.reshape(rhs.shape[:-2] + (n * n, 1)))
    solution = flat.reshape(rhs.shape)
    return 0.5 * (solution + np.swapaxes(solution, -1, -2))


def stationary_covariance(drift: np.ndarray, diffusion: np.ndarray) -> np.ndarray:
    """C solving the continuous Lyapunov equation A C + C A^T = 2 D (a stack: by Kronecker solves)."""
    if drift.ndim == 2:
        solution = scipy.linalg.solve_continuous_lyapunov(drift, 2.0 * diffusion)
        return 0.5 * (solution + solution.T)
    eye = np.broadcast_to(np.eye(drift.shape[-1]), drift.shape)
    operator = _batched_kron(drift, eye) + _batched_kron(eye, drift)
    return _kron_solve(operator, 2.0 * diffusion)


def discrete_stationary_covariance(transition: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """P solving the discrete Lyapunov equation P = T P T^T + Q."""
    if transition.ndim == 2:
        solution = scipy.linalg.solve_discrete_lyapunov(transition, covariance)
        return 0.5 * (solution + solution.T)
    n2 = transition.shape[-1] ** 2
    operator = np.eye(n2) - _batched_kron(transition, transition)
    return _kron_solve(operator, covariance)


def _batched_kron(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """kron(a, b) over leading axes: (vec X row-major) a X b^T  <->  kron(a, b) vec X."""
    n = a.shape[-1]
    return np.einsum("...ij,...kl->...ikjl", a, b).reshape(a.shape[:-2] + (n * n, n * n))


def matrix_powers(matrix: np.ndarray, exponents) -> np.ndarray:
    """matrix^k for every k in ``exponents`` (shape (*exponents.shape, *matrix.shape)), by squaring."""
    k = np.asarray(exponents, dtype=np.int64)
    shape = k.shape + (1,) * (matrix.ndim - 2) + (1, 1)
    bits = k.reshape(shape)
    result = np.broadcast_to(np.eye(matrix.shape[-1]), k.shape + matrix.shape).copy()
    base = matrix.copy()
    for bit in range(int(k.max(initial=0)).bit_length()):
        result = np.where((bits >> bit) & 1 == 1, result @ base, result)
        base = base @ base
    return result


# ---- moments from a Gaussian start ---------------------------------------------------------


class Moments(NamedTuple):
    """Mean (n, 2d) and covariance (n, 2d, 2d) of the phase-space state at each requested time."""

    mean: np.ndarray
    covariance: np.ndarray


def _propagate(propagators: np.ndarray, stationary: np.ndarray, mean0, cov0) -> Moments:
    mean = propagators @ np.asarray(mean0, float)
    transpose = np.swapaxes(propagators, -1, -2)
    covariance = stationary - propagators @ stationary @ transpose + propagators @ np.asarray(cov0, float) @ transpose
    return Moments(mean, covariance)


def continuous_moments(drift, diffusion, mean0, cov0, times) -> Moments:
    """Exact moments of the Langevin model at physical times ``times`` (M = expm(-A t))."""
    propagators = np.stack([scipy.linalg.expm(-drift * t) for t in np.asarray(times, float)])
    return _propagate(propagators, stationary_covariance(drift, diffusion), mean0, cov0)


def discrete_moments(transition, covariance, mean0, cov0, steps) -> Moments:
    """Exact moments of the SGD recursion after ``steps`` steps (M = T^k)."""
    propagators = matrix_powers(transition, steps)
    return _propagate(propagators, discrete_stationary_covariance(transition, covariance), mean0, cov0)


# ---- modified loss and probability currents ------------------------------------------------


def modified_loss_matrix(stationary: np.ndarray) -> np.ndarray:
    """C^{-1}: the modified loss is Psi(x) = 1/2 x^T C^{-1} x, and p_ss ~ exp(-Psi)."""
    return np.linalg.inv(stationary)


def current_matrix(drift, diffusion, stationary) -> np.ndarray:
    """Q_c = A C - D (antisymmetric): the drift splits as -A x = -(D + Q_c) C^{-1} x."""
    return drift @ stationary - diffusion


def probability_current(drift, diffusion, stationary, x) -> np.ndarray:
    """J(x) / p_ss(x) = -Q_c C^{-1} x: the divergence-free velocity of the stationary current.

    ``x`` is (..., 2d); for a mode it is the oscillator's flow (v, -omega^2 theta).
    """
    velocity = -current_matrix(drift, diffusion, stationary) @ modified_loss_matrix(stationary)
    return np.asarray(x) @ velocity.T


def isotropic_modified_loss(
    hessian, weight_decay: float, lr: float, momentum: float, sigma2: float, batch_size: int
) -> tuple[np.ndarray, float]:
    """(Psi's matrix, temperature T) when Sigma_g = sigma^2 H, in the form p_ss ~ exp(-Psi / T):

    Psi = 1/2 theta^T (H + lam) H^{-1} theta + lr (1 + beta) / 4 v^T H^{-1} v,
    T = lr sigma^2 / (2 S (1 - beta)).
    """
    h = np.asarray(hessian, float)
    h_inv = np.linalg.inv(h)
    zero = np.zeros_like(h)
    theta_block = (h + weight_decay * np.eye(h.shape[-1])) @ h_inv
    matrix = _blocks(theta_block, zero, zero, lr * (1.0 + momentum) / 2.0 * h_inv)
    return matrix, lr * sigma2 / (2.0 * batch_size * (1.0 - momentum))


# ---- linear regression ---------------------------------------------------------------------


class RegressionModel(NamedTuple):
    """Linear regression's quadratic: L(w) = 1/2 (w - w_hat)^T H (w - w_hat) + L_min."""

    hessian: np.ndarray
    minimizer: np.ndarray
    min_loss: float

    def centre(self, weight_decay: float = 0.0) -> np.ndarray:
        """argmin L(w) + lam/2 |w|^2 = (H + lam)^{-1} H w_hat."""
        k = self.hessian + weight_decay * np.eye(len(self.minimizer))
        return np.linalg.solve(k, self.hessian @ self.minimizer)


def regression_model(inputs, targets) -> RegressionModel:
    """H = X^T X / n and the least-squares minimizer of 1/(2n) |X w - y|^2."""
    x, y = np.asarray(inputs, float), np.asarray(targets, float)
    hessian = x.T @ x / len(y)
    minimizer = np.linalg.lstsq(x, y, rcond=None)[0]
    return RegressionModel(hessian, minimizer, 0.5 * float(np.mean((x @ minimizer - y) ** 2)))


def residual_noise(losses) -> float:
    """sigma_r^2 = mean squared residual = 2 x the mean loss over stationary iterates.

    Near the minimizer Sigma_g ~ sigma_r^2 H; using the residuals the iterates actually see (not the
    label noise) accounts for the noise growing away from the optimum.
    """
    return 2.0 * float(np.mean(losses))
