"""The underdamped Langevin model: integrators, noise, and the continuous-time theory.

Oracles: the closed-form stationary variances of the SDE (derived by hand, independent of the
Lyapunov solver), scipy's Lyapunov solvers and expm, the exact stationary covariance of the
Euler-Maruyama map (a discrete Lyapunov equation), per-example gradients of linear regression
in closed form, finite-difference divergence of the probability current, and ensembles of chains.
"""

import equinox as eqx
import jax
import numpy as np
import pytest
import scipy.linalg

from eosflow.config import SpecError
from eosflow.experiment import prepare
from eosflow.optim.sgd import minibatch_noise_scale
from eosflow.theory import linear_regression as theory
from test_sgd import (
    COPIES,
    LR,
    LR_CURVATURES,
    MOMENTUM,
    assert_moments_match,
    batch_means_error,
    ensemble_positions,
    grouped,
    run_noisy_quadratic,
)


def test_baoab_samples_the_continuous_stationary_variance():
    """For a quadratic BAOAB's position marginal is exact at any stable dt, so one substep per SGD
    step reproduces Var(theta) = lr s^2 / (2 (1 - beta) h), which is *not* SGD's (by the factor)."""
    rows = run_noisy_quadratic("langevin", 20000, integrator="baoab", substeps=1)
    per_group = grouped(np.asarray(rows["position"]) ** 2)
    h = np.array(LR_CURVATURES) / LR
    continuous = theory.mode_variances(h, 1.0, LR, MOMENTUM, "continuous").theta
    measured = per_group.mean(axis=0)
    errors = np.array([batch_means_error(per_group[:, g]) for g in range(len(h))])
    assert np.all(np.abs(measured - continuous) < 4 * errors), (measured, continuous, errors)
    discrete = theory.mode_variances(h, 1.0, LR, MOMENTUM, "discrete").theta
    assert discrete[-1] - measured[-1] > 10 * errors[-1]


def test_euler_maruyama_samples_its_own_stationary_covariance():
    """EM's stationary law solves P = (I - A dt) P (I - A dt)^T + 2 D dt; it tends to the SDE's."""
    substeps = 4  # EM is stable iff substeps > lr h / (1 - beta) = 3 for the stiffest mode here
    curvatures = (0.1, 0.3)
    eigenvalues = list(np.repeat(np.array(curvatures) / LR, COPIES))
    table = {
        "lr": LR,
        "dtype": "float64",
        "processes": ["langevin"],
        "spectrum": {"every": 0},
        "problem": {"name": "quadratic", "eigenvalues": eigenvalues, "rotate": False, "init_scale": 0.01},
        "langevin": {
            "momentum": MOMENTUM,
            "gradient_noise": 1.0,
            "batch_size": 1,
            "integrator": "euler_maruyama",
            "substeps": substeps,
        },
    }
    _, problem, _, processes = prepare(table)
    p = processes["langevin"]
    state, _ = p.advance(p.init(problem.w0), 500)
    _, rows = p.advance(state, 20000)
    squares = np.asarray(rows["position"]) ** 2
    per_group = squares.reshape(len(squares), 2, COPIES).mean(axis=2)
    h = np.array(curvatures) / LR
    drift, diffusion = theory.continuous_system(h[:, None, None], np.ones((2, 1, 1)), LR, MOMENTUM)
    dt = LR / substeps
    em = theory.discrete_stationary_covariance(np.eye(2) - drift * dt, 2 * diffusion * dt)[:, 0, 0]
    measured = per_group.mean(axis=0)
    errors = np.array([batch_means_error(per_group[:, g]) for g in range(2)])
    assert np.all(np.abs(measured - em) < 4 * errors), (measured, em, errors)
    continuous = theory.mode_variances(h, 1.0, LR, MOMENTUM, "continuous").theta
    assert em[1] / continuous[1] > 1.2  # the O(dt) bias at lr h = 0.3 ...
    fine = theory.discrete_stationary_covariance(np.eye(2) - drift * dt / 100, 2 * diffusion * dt / 100)
    np.testing.assert_allclose(fine[:, 0, 0], continuous, rtol=0.01)  # ... vanishes as dt -> 0


def test_transient_moments_match_the_continuous_solution():
    """Mean and covariance of theta from a fixed start: expm and Lyapunov vs 3000 BAOAB chains."""
    lr, beta, sigma = 0.2, 0.6, 0.5
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": ["langevin"],
        "spectrum": {"every": 0},
        "problem": {"name": "quadratic", "eigenvalues": [3.0, 0.5], "rotate": True, "init_scale": 2.0},
        "langevin": {"momentum": beta, "gradient_noise": sigma, "batch_size": 1, "substeps": 8},
    }
    _, problem, _, processes = prepare(table)
    steps = np.array([2, 8, 30])
    positions = ensemble_positions(processes["langevin"], "noise_key", problem.w0, steps, 3000, seed=1)
    hessian = np.asarray(jax.jit(jax.hessian(problem.objective.value))(problem.w0))
    drift, diffusion = theory.continuous_system(hessian, sigma**2 * np.eye(2), lr, beta)
    start = np.concatenate([np.asarray(problem.w0), np.zeros(2)])
    moments = theory.continuous_moments(drift, diffusion, start, np.zeros((4, 4)), lr * steps)
    assert_moments_match(positions, moments, 2)


def test_noise_has_the_minibatch_gradient_covariance():
    """zeta ~ N(0, c Sigma_g(theta) + sigma^2 I / S) with Sigma_g from per-example gradients."""
    table = {
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["sgd", "langevin"],
        "spectrum": {"every": 0},
        "problem": {"name": "linear_regression", "dim": 5, "n_train": 30},
        "sgd": {"batch_size": 6, "sampling": "without_replacement", "gradient_noise": 0.2},
    }
    _, problem, _, processes = prepare(table)
    langevin = processes["langevin"]
    w = problem.w0
    keys = jax.random.split(jax.random.PRNGKey(2), 20000)
    draws = np.asarray(eqx.filter_jit(jax.vmap(lambda k: langevin.noise(w, k)))(keys))
    x, y = map(np.asarray, problem.objective.data)
    per_example = x * (x @ np.asarray(w) - y)[:, None]
    expected = minibatch_noise_scale(30, 6, "without_replacement") * np.cov(per_example.T, bias=True)
    expected += 0.04 / 6 * np.eye(5)
    assert np.linalg.norm(np.cov(draws.T) - expected) < 0.05 * np.linalg.norm(expected)


def test_options_default_to_the_sgd_table():
    table = {
        "lr": 0.05,
        "processes": ["sgd", "langevin"],
        "spectrum": {"every": 0},
        "problem": {"name": "linear_regression", "dim": 3, "n_train": 20},
        "sgd": {"batch_size": 4, "momentum": 0.5, "weight_decay": 0.01},
        "langevin": {"momentum": 0.7},
    }
    _, _, _, processes = prepare(table)
    sgd = processes["langevin"].sgd
    assert (sgd.batch_size, sgd.momentum, sgd.weight_decay) == (4, 0.7, 0.01)
    table["langevin"] = {"integrator": "leapfrog"}
    with pytest.raises(SpecError, match="langevin.integrator"):
        prepare(table)
    table["langevin"] = {"substeps": 0}
    with pytest.raises(SpecError, match="langevin.substeps"):
        prepare(table)


# ---- the theory's closed forms and identities -----------------------------------------------


def random_rotation(d, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


def test_lyapunov_covariances_match_the_per_mode_closed_forms():
    """Full-matrix Lyapunov solutions (scipy) for a rotated H with Xi = sigma^2 H / S equal the
    per-mode formulas rotated, in both the continuous and the exact discrete model."""
    lr, beta, sigma2, batch = 0.1, 0.9, 0.7, 4
    values = np.array([14.0, 5.0, 1.0, 0.2])
    rotation = random_rotation(4)
    hessian = rotation @ np.diag(values) @ rotation.T
    s2 = sigma2 * values / batch
    for model, system, solve in (
        ("continuous", theory.continuous_system, theory.stationary_covariance),
        ("discrete", theory.discrete_system, theory.discrete_stationary_covariance),
    ):
        cov = solve(*system(hessian, sigma2 * hessian / batch, lr, beta))
        per_mode = theory.mode_variances(values, s2, lr, beta, model)
        theta_block = rotation.T @ cov[:4, :4] @ rotation
        np.testing.assert_allclose(theta_block, np.diag(per_mode.theta), atol=1e-12 * per_mode.theta.max())
        # the batched per-mode (Kronecker) solver agrees with scipy
        batched = solve(*system(values[:, None, None], s2[:, None, None], lr, beta))
        np.testing.assert_allclose(batched[:, 0, 0], per_mode.theta, rtol=1e-10)
        second = batched[:, 1, 1] * (lr**2 if model == "discrete" else 1.0)
        np.testing.assert_allclose(second, per_mode.step if model == "discrete" else per_mode.velocity, rtol=1e-10)


def test_modified_loss_closed_form_and_the_probability_current():
    lr, beta, lam, sigma2, batch = 0.05, 0.8, 0.3, 2.0, 8
    rotation = random_rotation(3, seed=1)
    values = np.array([9.0, 2.0, 0.5])
    hessian = rotation @ np.diag(values) @ rotation.T
    drift, diffusion = theory.continuous_system(hessian + lam * np.eye(3), sigma2 * hessian / batch, lr, beta)
    cov = theory.stationary_covariance(drift, diffusion)
    # the Lyapunov solution satisfies its equation
    np.testing.assert_allclose(drift @ cov + cov @ drift.T, 2 * diffusion, atol=1e-12)
    matrix, temperature = theory.isotropic_modified_loss(hessian, lam, lr, beta, sigma2, batch)
    np.testing.assert_allclose(theory.modified_loss_matrix(cov) * temperature, matrix, rtol=1e-9, atol=1e-12)
    current = theory.current_matrix(drift, diffusion, cov)
    np.testing.assert_allclose(current, -current.T, atol=1e-12)
    # J = -Q C^-1 x p_ss is divergence-free (central differences at random points)
    inverse = np.linalg.inv(cov)

    def flux(x):
        return theory.probability_current(drift, diffusion, cov, x) * np.exp(-0.5 * x @ inverse @ x)

    rng = np.random.default_rng(0)
    scale = np.sqrt(np.diag(cov))
    for _ in range(5):
        x = rng.standard_normal(6) * scale
        eps = 1e-5 * scale
        divergence = sum((flux(x + e)[i] - flux(x - e)[i]) / (2 * e[i]) for i, e in enumerate(np.diag(eps)))
        typical = np.linalg.norm(flux(x) / scale)
        assert abs(divergence) < 1e-6 * typical
    # per mode the current is the oscillator's flow (v, -omega^2 theta)
    h = np.array([3.0])
    a, d = theory.continuous_system(h[:, None], np.ones((1, 1)), lr, beta)
    c = theory.stationary_covariance(a, d)
    omega2 = theory.frequency(h, lr, beta)[0] ** 2
    np.testing.assert_allclose(theory.probability_current(a, d, c, np.array([0.3, -0.7])), [-0.7, -omega2 * 0.3])


@pytest.mark.parametrize("curvature", [30.0, 0.05, "critical"])
def test_oscillator_propagator_is_the_matrix_exponential(curvature):
    lr, beta = 0.1, 0.9
    if curvature == "critical":
        curvature = theory.friction(lr, beta) ** 2 * theory.mass(lr, beta)
    drift, _ = theory.continuous_system(np.array([[curvature]]), np.ones((1, 1)), lr, beta)
    times = np.array([0.0, 0.05, 1.0, 7.0, 300.0])
    expected = np.stack([scipy.linalg.expm(-drift * t) for t in times])
    got = theory.oscillator_propagator(np.array(curvature), lr, beta, times)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_matrix_powers_and_discrete_moments():
    rng = np.random.default_rng(4)
    matrix = 0.3 * rng.standard_normal((3, 3))
    powers = theory.matrix_powers(matrix, np.array([0, 1, 7, 64]))
    for k, p in zip([0, 1, 7, 64], powers):
        np.testing.assert_allclose(p, np.linalg.matrix_power(matrix, k), atol=1e-14)
    # moments at k steps = k applications of the recursion m <- T m, P <- T P T^T + Q
    transition, noise = theory.discrete_system(np.diag([2.0, 0.5]), 0.1 * np.eye(2), 0.3, 0.5)
    mean, cov = np.array([1.0, -1.0, 0.0, 0.0]), np.zeros((4, 4))
    moments = theory.discrete_moments(transition, noise, mean, cov, np.array([5]))
    for _ in range(5):
        mean, cov = transition @ mean, transition @ cov @ transition.T + noise
    np.testing.assert_allclose(moments.mean[0], mean, atol=1e-12)
    np.testing.assert_allclose(moments.covariance[0], cov, atol=1e-12)
