"""Thresholds against the spectral radius of each linearized iteration; the preconditioned
operator against dense eigenvalues of P^{-1} H."""

import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.preconditioning import diagonal_preconditioner, edge_threshold, preconditioned_matvec, stability_constant


def iteration_matrix(form: str, h: float, b: float) -> np.ndarray:
    """The linear map of one step on the quadratic a x^2 / 2 with h = lr a (state: two numbers)."""
    if form == "classical":  # (w, w_prev): w+ = w - h w + b (w - w_prev)
        return np.array([[1 - h + b, -b], [1.0, 0.0]])
    if form == "ema":  # (w, m): m+ = b m + (1 - b) a w; w+ = w - lr m+  (in units where lr m -> m)
        return np.array([[1 - (1 - b) * h, -b], [(1 - b) * h, b]])
    if form == "nesterov":  # (w, w_prev): y = w + b (w - w_prev); w+ = (1 - h) y
        return np.array([[(1 - h) * (1 + b), -(1 - h) * b], [1.0, 0.0]])
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["classical", "ema", "nesterov"])
@pytest.mark.parametrize("b", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_threshold_is_where_the_linearized_iteration_loses_stability(form, b):
    c = stability_constant(b, form)
    radius = lambda h: np.max(np.abs(np.linalg.eigvals(iteration_matrix(form, h, b))))  # noqa: E731
    assert radius(c * (1 - 1e-6)) < 1.0
    assert radius(c * (1 + 1e-6)) > 1.0
    # and nowhere below it (a scan of (0, c))
    assert all(radius(h) < 1.0 for h in np.linspace(1e-3, c * (1 - 1e-3), 200))


def test_adam_threshold_is_38_over_lr():
    assert edge_threshold(0.01, 0.9, "ema") == pytest.approx(3800.0, rel=1e-12)
    assert edge_threshold(0.5) == 4.0


def test_bad_momentum_and_form_are_named():
    with pytest.raises(ValueError, match="momentum"):
        stability_constant(1.0)
    with pytest.raises(ValueError, match="momentum form 'heavy'"):
        stability_constant(0.5, "heavy")  # type: ignore[arg-type]


@pytest.mark.parametrize("d,seed", [(5, 0), (12, 1), (30, 2)])
def test_preconditioned_operator_has_the_eigenvalues_of_p_inverse_h(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    hessian = a @ a.T - d * 0.3 * np.eye(d)
    nu = rng.uniform(0.01, 4.0, size=d)
    p = np.asarray(diagonal_preconditioner(jnp.asarray(nu), eps=1e-3, eps_root=1e-8, bias_correction=0.2))
    np.testing.assert_allclose(p, np.sqrt(nu / 0.2 + 1e-8) + 1e-3, rtol=1e-14)
    op = preconditioned_matvec(lambda v: jnp.asarray(hessian) @ v, jnp.asarray(p))
    dense = np.asarray(op(jnp.eye(d)))
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    expected = np.sort(np.linalg.eigvals(np.diag(1 / p) @ hessian).real)
    np.testing.assert_allclose(np.linalg.eigvalsh(dense), expected, rtol=1e-9, atol=1e-9)
