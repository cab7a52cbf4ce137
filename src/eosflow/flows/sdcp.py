"""The semidefinite complementarity problem (SDCP) of the central flow, solved inside jit.

Given a symmetric m x m matrix ``alpha`` and a self-adjoint PSD linear operator ``beta`` on
symmetric matrices, find X with

    X >= 0,   Z = alpha + beta[X] >= 0,   <X, Z> = 0          (>= 0: positive semidefinite)

which is the KKT system of the convex problem  min_{X >= 0} 1/2 <X, beta[X]> + <alpha, X>.

Matrix <-> vector convention. Symmetric matrices are vectorized by the *orthonormal* map
``svec`` (the upper triangle column by column, off-diagonal entries times sqrt 2),
so that <X, Y> = svec(X) . svec(Y); ``beta`` is passed as the p x p matrix B with
svec(beta[X]) = B svec(X), p = m (m + 1) / 2. For the central flow, where
beta[X]_ij = c <G_ij, sum_kl X_kl G_kl> over *ordered* pairs (k, l), this means
B = c Gs Gs^T with the scaled pair gradients Gs_p = s_p G_p, s_p = 1 on the diagonal and
sqrt 2 off it (see :func:`pair_scale`): each off-diagonal pair then weighs s_p^2 = 2, as the
ordered sum requires.

Solver (m >= 2): semismooth Newton on Moreau's decomposition. Any symmetric Y splits as
Y = Pi(Y) - Pi(-Y) (Pi: projection on the PSD cone); with X = Pi(Y) and tau Z = Pi(-Y), X >= 0,
Z >= 0 and <X, Z> = 0 hold by construction, and the SDCP becomes the equation

    F(Y) = tau (alpha + beta[Pi(Y)]) + Y - Pi(Y) = 0,

solved by Newton steps with the generalized Jacobian I + (tau B - I) DPi(Y) (DPi from Y's
eigendecomposition), a short line search on |F| and a projected-gradient fallback. alpha >= 0
returns X = 0 without iterating; alpha < 0 with a PSD X = -B^{-1} alpha takes one Newton step.
For m = 1 the closed form X = max(0, -alpha / beta) is used.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

SQRT2 = float(np.sqrt(2.0))


class SDCPSolution(NamedTuple):
    """X (m x m), the residual (||F(Y)|| / tau; for m = 1 ||X - Pi(X - Z)||) and the iterations."""

    X: Float[Array, "m m"]
    residual: Array
    iterations: Array


def pair_indices(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows i and columns j of the pairs i <= j, column by column: (0,0), (0,1), (1,1), (0,2), ...

    The pairs of the leading m' x m' block come first (the first m'(m'+1)/2 entries), so a
    problem padded to size m keeps its pairs where the unpadded one has them.
    """
    cols, rows = np.tril_indices(m)  # (j, i) with i <= j, ordered by j then i
    return rows, cols


def pair_scale(m: int) -> np.ndarray:
    """s_p: 1 for diagonal pairs, sqrt 2 for off-diagonal pairs (svec(X)_p = s_p X_ij)."""
    rows, cols = pair_indices(m)
    return np.where(rows == cols, 1.0, SQRT2)


@functools.cache
def svec_basis(m: int) -> np.ndarray:
    """E (m^2 x p) with vec(X) = E svec(X), vec row-major; its columns are orthonormal.

    Column p is vec of e_i e_i^T (i = j) or (e_i e_j^T + e_j e_i^T) / sqrt 2 (i < j).
    """
    rows, cols = pair_indices(m)
    basis = np.zeros((m, m, rows.size))
    scale = 1.0 / pair_scale(m)
    basis[rows, cols, np.arange(rows.size)] = scale
    basis[cols, rows, np.arange(rows.size)] = scale
    basis.flags.writeable = False
    return basis.reshape(m * m, rows.size)


def svec(matrix: Float[Array, "m m"]) -> Float[Array, " p"]:
    """The orthonormal vectorization of a symmetric matrix: <X, Y> = svec(X) . svec(Y)."""
    m = matrix.shape[-1]
    return jnp.asarray(svec_basis(m).T, matrix.dtype) @ matrix.reshape(m * m)


def smat(vector: Float[Array, " p"]) -> Float[Array, "m m"]:
    """The inverse of :func:`svec`."""
    m = int(round((np.sqrt(8 * vector.shape[-1] + 1) - 1) / 2))
    return (jnp.asarray(svec_basis(m), vector.dtype) @ vector).reshape(m, m)


def congruence(rotation: Float[Array, "m m"]) -> Float[Array, "p p"]:
    """T with svec(V X V^T) = T svec(X), for V = ``rotation`` (orthogonal if V is)."""
    basis = jnp.asarray(svec_basis(rotation.shape[0]), rotation.dtype)
    return basis.T @ jnp.kron(rotation, rotation) @ basis


def project_psd(matrix: Float[Array, "m m"]) -> Float[Array, "m m"]:
    """Pi(X): the nearest PSD matrix in Frobenius norm (negative eigenvalues set to zero)."""
    values, vectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * jnp.maximum(values, 0.0)) @ vectors.T


def natural_residual(X: Array, Z: Array) -> Array:
    """||X - Pi(X - Z)||_F: zero exactly at a solution of the SDCP."""
    return jnp.linalg.norm(X - project_psd(X - Z))


def solve_sdcp(
    alpha: Float[Array, "m m"], beta: Float[Array, "p p"], tol: float | None = None, max_iters: int = 30
) -> SDCPSolution:
    """Solve X >= 0, alpha + beta[X] >= 0, <X, alpha + beta[X]> = 0 (see the module docstring).

    ``beta`` is the svec matrix of the operator (PSD). ``tol`` bounds ||F(Y)|| / tau (which has
    the units of Z), relative to 1 + ||alpha||_F (default: 1000 machine epsilons).
    """
    m = alpha.shape[0]
    dtype = alpha.dtype
    eps = jnp.finfo(dtype).eps
    tolerance = 1e3 * eps if tol is None else tol
    a = svec(alpha)
    scale = 1.0 + jnp.linalg.norm(a)
    if m == 1:
        x = jnp.maximum(0.0, -a / jnp.maximum(beta[0, 0], jnp.finfo(dtype).tiny))
        X = x.reshape(1, 1)
        return SDCPSolution(X, natural_residual(X, alpha + beta[0, 0] * X), jnp.asarray(0))

    tau = a.size / jnp.maximum(jnp.trace(beta), jnp.sqrt(jnp.finfo(dtype).tiny))  # 1 / mean eigenvalue
    eye = jnp.eye(a.size, dtype=dtype)
    steps = 0.5 ** jnp.arange(1, 10, dtype=dtype)

    rows, cols = pair_indices(m)

    def equation(y):
        """F(Y) = tau (alpha + beta[Pi(Y)]) + Y - Pi(Y), zero iff X = Pi(Y) solves the SDCP;
        returned with Y's eigenpairs (X = Pi(Y) = V max(lambda, 0) V^T)."""
        values, vectors = jnp.linalg.eigh(smat(y))
        x = svec((vectors * jnp.maximum(values, 0.0)) @ vectors.T)
        return tau * (a + beta @ x) + y - x, values, vectors

    def iterate(carry):
        y, (f, values, vectors), merit, iteration = carry
        # generalized Jacobian of Pi at Y: congruence to the eigenbasis, Hadamard with Omega
        positive = jnp.maximum(values, 0.0)
        gap = values[:, None] - values[None, :]
        same = jnp.abs(gap) <= eps * (1.0 + jnp.max(jnp.abs(values)))
        omega = jnp.where(
            same,
            (values[:, None] + values[None, :] > 0).astype(dtype),
            (positive[:, None] - positive[None, :]) / jnp.where(same, 1.0, gap),
        )
        rotate = congruence(vectors)
        d_project = rotate @ (omega[rows, cols][:, None] * rotate.T)
        jacobian = eye + (tau * beta - eye) @ d_project
        newton = jnp.linalg.solve(jacobian + 10 * eps * eye, -f)

        def search(_):
            """Damped Newton steps and the projected-gradient point Y - F; the smallest |F| wins."""
            candidates = jnp.concatenate([y + steps[:, None] * newton, (y - f)[None]])
            merits = jax.vmap(lambda c: jnp.linalg.norm(equation(c)[0]))(candidates)
            best = candidates[jnp.argmin(merits)]
            return best, equation(best)

        full = y + newton
        at_full = equation(full)
        accept = jnp.linalg.norm(at_full[0]) < (1.0 - 1e-4) * merit
        y, at_y = jax.lax.cond(accept, lambda _: (full, at_full), search, None)
        return y, at_y, jnp.linalg.norm(at_y[0]), iteration + 1

    def not_done(carry):
        _, _, merit, iteration = carry
        return (merit > tolerance * tau * scale) & (iteration < max_iters)

    y0 = -tau * a
    at_y0 = equation(y0)
    carry = (y0, at_y0, jnp.linalg.norm(at_y0[0]), jnp.asarray(0))
    y, (_, values, vectors), merit, iterations = jax.lax.while_loop(not_done, iterate, carry)
    X = (vectors * jnp.maximum(values, 0.0)) @ vectors.T
    return SDCPSolution(X, merit / tau, iterations)
