"""The phase-space rod's matched linear rate (``rod_rate = "matched"``, docs/adaptive.md section 5b).

Oracles: scipy's matrix logarithm, the optimizer's own update rule (its one-step map on a quadratic), and the
discrete iterates of a rotating mode below the edge, which the rod must follow at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from eosflow.experiment import prepare
from eosflow.flows.phase_rod import SLOWEST_RATE, Rod, matched_correction, rod_direction

RULES = {  # optimizer, hyperparameters
    "ema b=0.9": ("momentum", {"beta": 0.9, "form": "ema"}),
    "ema b=0.5": ("momentum", {"beta": 0.5, "form": "ema"}),
    "classical b=0.6": ("momentum", {"beta": 0.6, "form": "classical"}),
    "nesterov b=0.4": ("nesterov", {"beta": 0.4}),
}


def expected_correction(m: np.ndarray) -> np.ndarray:
    """f(M) by eigendecomposition (eigenvalues apart): f(mu) = log mu - (mu - 1) where Re mu > 0 and
    log |mu| >= -4, else 0."""
    mu, vectors = np.linalg.eig(m)
    usable = (mu.real > 0) & (np.log(np.abs(mu)) >= SLOWEST_RATE)
    values = np.where(usable, np.log(np.where(usable, mu, 1.0)) - (mu - 1.0), 0.0)
    return (vectors @ np.diag(values) @ np.linalg.inv(vectors)).real


def test_the_matched_correction_is_the_matrix_function_on_each_usable_eigenvalue():
    rng = np.random.default_rng(3)
    kinds = {"all": 0, "some": 0, "none": 0}
    for i in range(900):
        m = rng.normal(size=(2, 2)) * rng.choice([1e-3, 0.5, 2.0])
        if i % 4 == 0:  # a (near-)double eigenvalue, where the divided difference becomes a derivative
            t = rng.uniform(0.05, 3.0)
            q = rng.normal(size=(2, 2))
            m = q @ np.array([[t, rng.normal() * 1e-5], [0.0, t * (1 + rng.normal() * 1e-9)]]) @ np.linalg.inv(q)
        mu = np.linalg.eigvals(m)
        usable = (mu.real > 0) & (np.log(np.abs(mu)) >= SLOWEST_RATE)
        margin = np.abs(np.log(np.abs(mu)) - SLOWEST_RATE).min()
        if margin < 1e-6 or (abs(mu[0] - mu[1]) < 1e-3 and usable.any() and not usable.all()):
            continue  # at a cutoff f jumps
        kinds["all" if usable.all() else "some" if usable.any() else "none"] += 1
        # all usable: scipy's logm (an eigendecomposition is ill-conditioned at a near-double eigenvalue)
        expected = scipy.linalg.logm(m).real - (m - np.eye(2)) if usable.all() else expected_correction(m)
        got = np.asarray(matched_correction(jnp.asarray(m)))
        assert np.allclose(got, expected, rtol=1e-7, atol=1e-9 * max(1.0, np.abs(expected).max())), (m, mu)
    assert min(kinds.values()) > 30, kinds


def test_the_rod_direction_survives_a_zero_w_part():
    e = jnp.asarray([0.6, 0.0, -0.8])
    for w_part, m_part in [(2.0 * e, 0.5 * e), (0.0 * e, -3.0 * e), (1e-3 * e, 0.0 * e)]:
        assert abs(abs(float(jnp.vdot(rod_direction(w_part, m_part), e))) - 1.0) < 1e-12
    assert float(jnp.linalg.norm(rod_direction(0.0 * e, 0.0 * e))) == 0.0


def quadratic_model(case: str, ratio: float, rod_rate: str = "matched"):
    """The update rule of ``case``, its rod flow, lr, the Hessian and its top eigenvector on a rotated 3-D
    quadratic whose top curvature puts lr * lambda at ``ratio`` times the optimizer's threshold."""
    name, hyper = RULES[case]
    eigenvalues = (10.0, 3.0, 1.0)

    def processes(lr: float) -> dict:
        table = {
            "lr": lr,
            "dtype": "float64",
            "processes": [name, f"{name}_rod_flow"],
            "problem": {"name": "quadratic", "eigenvalues": list(eigenvalues), "rotate": True},
            "spectrum": {"every": 0},
            name: hyper,
            f"{name}_rod_flow": {"rod_rate": rod_rate, "substeps": 8},
        }
        return prepare(table)[1:4:2]

    _, at_one = processes(1.0)
    lr = ratio * at_one[name].rule.threshold(1.0) / eigenvalues[0]
    problem, built = processes(lr)
    hessian = jax.jit(jax.hessian(problem.objective.value))(jnp.zeros(3))
    return built[name].rule, built[f"{name}_rod_flow"], lr, hessian, jnp.linalg.eigh(hessian)[1][:, -1]


def one_step_matrix(rule, lr: float, curvature: float) -> np.ndarray:
    """The optimizer's linear map (w, m) -> (w', m') along a direction of curvature ``curvature`` (P = 1),
    built column by column from its own update rule."""
    columns = []
    for w, m in [(1.0, 0.0), (0.0, 1.0)]:
        state = rule.init(jnp.zeros(1))._replace(m=jnp.asarray([m]))
        step, new = rule.update(jnp.asarray([curvature * w]), state, lr)
        columns.append([w + float(step[0]), float(new.m[0])])
    return np.asarray(columns).T


@pytest.mark.parametrize("case", list(RULES))
@pytest.mark.parametrize("ratio", [0.6, 0.9, 1.05])
def test_the_rods_one_step_map_is_minus_the_optimizers(case, ratio):
    rule, flow, lr, _, _ = quadratic_model(case, ratio)
    h = jnp.asarray(ratio * rule.threshold(1.0))
    expected = -one_step_matrix(rule, lr, float(h) / lr)
    assert np.allclose(np.asarray(flow.one_step_map(h)), expected, rtol=1e-12, atol=1e-12)


def rod_against_optimizer(case: str, ratio: float, rod_rate: str, steps: int = 40) -> float:
    """Start the optimizer on a mode along the top eigenvector, w0 = a u, m0 = c u, and the rod flow at the
    minimum with that rod; the largest |w_k - (-1)^k rho_w(k)| over ``steps`` steps, relative to the
    largest |w_k|."""
    rule, flow, lr, hessian, top = quadratic_model(case, ratio, rod_rate)
    mu, vectors = np.linalg.eig(np.asarray(flow.one_step_map(jnp.asarray(ratio * rule.threshold(1.0)))))
    if np.isreal(mu).all():  # real modes: start on the flip mode (the other, mu < 0 at Nesterov, is smooth)
        a, c = 0.01 * vectors[:, np.argmax(mu.real)].real / np.abs(vectors[:, np.argmax(mu.real)]).max()
    else:  # a rotating mode: any start is on it
        a, c = 0.01, 0.004 / lr
    rho_w, rho_m = a * top, c * top
    state = rule.init(rho_w)._replace(m=rho_m)
    w, iterates = rho_w, []
    for _ in range(steps):
        iterates.append(w)
        step, state = rule.update(hessian @ w, state, lr)
        w = w + step
    start = flow.init(jnp.zeros(3))
    start = start._replace(z=(start.z[0], Rod(rho_w, rho_m)))
    _, rows = flow.advance(start, steps)
    signs = (-1.0) ** np.arange(steps)
    predicted = signs[:, None] * np.asarray(rows["amplitude"])[:, None] * np.asarray(rows["top_vector"])
    iterates = np.asarray(iterates)
    return float(np.abs(predicted - iterates).max() / np.abs(iterates).max())


@pytest.mark.parametrize("case", list(RULES))
@pytest.mark.parametrize("ratio", [0.6, 0.8, 0.97, 1.03])
def test_the_matched_rod_follows_the_optimizers_mode_at_every_step(case, ratio):
    """Below the edge the optimizer's mode rotates (damped by sqrt(b) per step at EMA form); above it,
    it grows. The matched rod's time-1 flow is the optimizer's step on it, to the integrator's error.
    Where the rod's map turns by more than 90 degrees a step (Nesterov at 0.6: mu = -0.05 +- 0.16i) the
    mode is no rod mode and the rate stays first order."""
    rule, flow, _, _, _ = quadratic_model(case, ratio)
    mu = np.linalg.eigvals(np.asarray(flow.one_step_map(jnp.asarray(ratio * rule.threshold(1.0)))))
    if mu.real.max() > 0:
        assert rod_against_optimizer(case, ratio, "matched") < 2e-3
    else:
        assert rod_against_optimizer(case, ratio, "matched") == rod_against_optimizer(case, ratio, "first_order")


def test_the_first_order_rod_damps_the_rotating_mode_too_fast():
    """The reason for the matched rate: at EMA b = 0.9 and 0.8 of the edge the first-order rod's mode decays
    at 0.43 per step against the optimizer's 0.053 (docs/adaptive.md section 5b)."""
    assert rod_against_optimizer("ema b=0.9", 0.8, "first_order") > 0.5
    assert rod_against_optimizer("ema b=0.9", 0.8, "matched") < 2e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_the_matched_correction_is_accurate_in_each_precision_near_a_double_eigenvalue(dtype):
    """Where the divided difference meets its series (omega ~ eps^(1/5) tau), in float32 too: the float32
    figure is the inputs' own rounding, amplified by the near-double eigenvalue."""
    worst = 0.0
    for tau in (0.3, 0.95, 1.2):
        for ratio in np.geomspace(1e-7, 1e-1, 25):
            for sign in (1.0, -1.0):  # real or complex eigenvalues tau +- omega
                omega2 = sign * (ratio * tau) ** 2
                m = np.array([[tau, 1.0], [omega2, tau]])  # eigenvalues tau +- sqrt(omega2)
                expected = scipy.linalg.logm(m).real - (m - np.eye(2))
                got = np.asarray(matched_correction(jnp.asarray(m, dtype)), np.float64)
                worst = max(worst, np.abs(got - expected).max() / np.abs(expected).max())
    assert worst < (1e-5 if dtype == jnp.float32 else 1e-12), worst
