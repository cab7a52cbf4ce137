"""The central flow's semidefinite complementarity problem against independent oracles:
the k = 1 closed form, a generic convex solver (cvxpy + Clarabel), and the KKT conditions
checked with numpy's eigvalsh in float64."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.flows.sdcp import congruence, pair_indices, pair_scale, smat, solve_sdcp, svec

solve = jax.jit(solve_sdcp)


def random_instance(rng, m, conditioning=3):
    # beta = Gs Gs^T with Gs (p x conditioning*p): larger conditioning, better-conditioned beta
    """alpha symmetric with mixed-sign eigenvalues; beta = Gs Gs^T (a Gram operator, PSD)."""
    p = m * (m + 1) // 2
    scaled_grads = rng.standard_normal((p, conditioning * p)) * rng.uniform(0.1, 3.0)
    alpha = rng.standard_normal((m, m))
    return 0.5 * (alpha + alpha.T), scaled_grads


def upper_pairs(m):
    """The documented svec order: the upper triangle column by column, (0,0), (0,1), (1,1), (0,2), ..."""
    return [(i, j) for j in range(m) for i in range(j + 1)]


def numpy_beta(scaled_grads, X):
    """beta[X] from svec(beta[X]) = Gs Gs^T svec(X), with svec written out by hand."""
    pairs = upper_pairs(X.shape[0])
    vec = np.array([X[i, j] * (1.0 if i == j else np.sqrt(2)) for i, j in pairs])
    out = scaled_grads @ (scaled_grads.T @ vec)
    Z = np.zeros_like(X)
    for (i, j), value in zip(pairs, out):
        Z[i, j] = Z[j, i] = value / (1.0 if i == j else np.sqrt(2))
    return Z


def kkt_residuals(alpha, scaled_grads, X):
    Z = alpha + numpy_beta(scaled_grads, X)
    return -np.linalg.eigvalsh(X).min(), -np.linalg.eigvalsh(Z).min(), abs(np.sum(X * Z))


def cvxpy_solution(alpha, scaled_grads):
    m = alpha.shape[0]
    X = cp.Variable((m, m), PSD=True)
    vec = cp.hstack([X[i, j] * (1.0 if i == j else np.sqrt(2)) for i, j in upper_pairs(m)])
    objective = 0.5 * cp.sum_squares(scaled_grads.T @ vec) + cp.trace(alpha @ X)
    cp.Problem(cp.Minimize(objective)).solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return X.value


def test_svec_is_orthonormal_and_congruence_rotates():
    rng = np.random.default_rng(0)
    m = 4
    A, B = rng.standard_normal((2, m, m))
    A, B = A + A.T, B + B.T
    assert np.isclose(float(svec(jnp.asarray(A)) @ svec(jnp.asarray(B))), np.sum(A * B))
    by_hand = [A[i, j] * (1.0 if i == j else np.sqrt(2)) for i, j in upper_pairs(m)]
    np.testing.assert_allclose(svec(jnp.asarray(A)), by_hand, rtol=1e-14)
    np.testing.assert_allclose(smat(svec(jnp.asarray(A))), A, atol=1e-14)
    V = np.linalg.qr(rng.standard_normal((m, m)))[0]
    rotated = congruence(jnp.asarray(V)) @ svec(jnp.asarray(A))
    np.testing.assert_allclose(smat(rotated), V @ A @ V.T, atol=1e-12)


def test_pair_scale_weighs_off_diagonal_pairs_twice():
    """beta[X]_ij = <G_ij, sum over ORDERED (k, l) of X_kl G_kl> equals smat(Gs Gs^T svec(X))."""
    rng = np.random.default_rng(1)
    m, d = 3, 7
    G = rng.standard_normal((m, m, d))
    G = 0.5 * (G + G.transpose(1, 0, 2))  # G_ij = G_ji, as D^3 L[u_i, u_j, .]
    X = rng.standard_normal((m, m))
    X = X + X.T
    dense = np.einsum("ijd,kld,kl->ij", G, G, X)
    rows, cols = pair_indices(m)
    scaled = pair_scale(m)[:, None] * G[rows, cols]
    via_svec = smat(jnp.asarray(scaled @ scaled.T) @ svec(jnp.asarray(X)))
    np.testing.assert_allclose(via_svec, dense, rtol=1e-12)


@pytest.mark.parametrize("a, b", [(-0.7, 2.0), (0.3, 2.0), (-1e-3, 5e-4)])
def test_one_critical_direction_is_the_closed_form(a, b):
    solution = solve(jnp.array([[a]]), jnp.array([[b]]))
    assert float(solution.X[0, 0]) == pytest.approx(max(0.0, -a / b), rel=1e-14)
    # the same scalar problem embedded in a decoupled 2 x 2 one (beta block diagonal)
    alpha = jnp.diag(jnp.array([a, 0.4]))
    beta = jnp.diag(jnp.array([b, 3.0, 1.0]))
    X = np.asarray(solve(alpha, beta).X)
    np.testing.assert_allclose(X, np.diag([max(0.0, -a / b), 0.0]), atol=1e-12)


def test_alpha_psd_gives_zero():
    rng = np.random.default_rng(2)
    alpha, grads = random_instance(rng, 3)
    alpha = alpha + (1e-3 - np.linalg.eigvalsh(alpha).min()) * np.eye(3)
    solution = solve(jnp.asarray(alpha), jnp.asarray(grads @ grads.T))
    assert np.all(np.asarray(solution.X) == 0.0) and int(solution.iterations) == 0


def test_random_instances_match_cvxpy_and_satisfy_kkt():
    rng = np.random.default_rng(3)
    ranks, worst = [], 0.0
    for trial in range(40):
        m = 2 + trial % 3
        alpha, grads = random_instance(rng, m, conditioning=6)
        if trial % 5 == 0:
            alpha = alpha - 2.0 * np.eye(m)  # all directions overshooting: a full-rank X
        solution = solve(jnp.asarray(alpha), jnp.asarray(grads @ grads.T))
        X = np.asarray(solution.X)
        primal, dual, complementarity = kkt_residuals(alpha, grads, X)
        assert max(primal, dual, complementarity) < 1e-8, (trial, primal, dual, complementarity)
        reference = cvxpy_solution(alpha, grads)
        worst = max(worst, np.abs(X - reference).max() / max(1.0, np.abs(reference).max()))
        ranks.append(int(np.sum(np.linalg.eigvalsh(X) > 1e-9)))
    assert worst < 1e-6  # relative to max(1, max |X_ij|): cvxpy's own accuracy is about 1e-7
    assert len(set(ranks)) >= 3  # the instances exercise faces of several ranks, not only X = 0


def test_ill_conditioned_and_float32():
    rng = np.random.default_rng(4)
    alpha, grads = random_instance(rng, 4, conditioning=1)  # square Gs: beta far from well conditioned
    beta = grads @ grads.T
    X = np.asarray(solve(jnp.asarray(alpha), jnp.asarray(beta)).X)
    assert max(kkt_residuals(alpha, grads, X)) < 1e-8
    X32 = solve(jnp.asarray(alpha, jnp.float32), jnp.asarray(beta, jnp.float32)).X
    assert X32.dtype == jnp.float32
    alpha, grads = random_instance(rng, 3)
    X = np.asarray(solve(jnp.asarray(alpha), jnp.asarray(grads @ grads.T)).X)
    X32 = np.asarray(solve(jnp.asarray(alpha, jnp.float32), jnp.asarray(grads @ grads.T, jnp.float32)).X)
    np.testing.assert_allclose(X32, X, atol=1e-4 * (1 + np.abs(X).max()))
