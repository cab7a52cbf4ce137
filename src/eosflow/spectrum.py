"""The top of the Hessian spectrum: eigensolvers with an explicit tolerance contract.

Four solvers, all for the *largest algebraic* eigenvalues of a symmetric operator given by
Hessian-vector products (HVPs):

- :func:`lobpcg`: block LOBPCG in JAX, jittable, warm-startable. Each eigenpair is accepted when
  its relative residual ``||H v - lambda v|| <= tol * |lambda|``; costs k HVPs per iteration.
- :func:`lanczos`: ARPACK (``scipy.sparse.linalg.eigsh``) on the host, for one-off measurements.
- :func:`power_iteration`: what PyHessian does; kept as a baseline for benchmarks.
- :func:`dense_top_eigenpairs`: the float64 oracle, ``numpy.linalg.eigh`` of the dense Hessian.

The tracker (:func:`grow_tracked`) keeps one more vector than there are eigenvalues above the
threshold, so an eigenvalue that crosses it is already being tracked when it does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
from jaxtyping import Array, Float

from eosflow import compiled
from eosflow.objective import Objective
from eosflow.preconditioning import preconditioned_matvec

BlockMatvec = Callable[[Float[Array, "d k"]], Float[Array, "d k"]]
Carry = Literal["ritz", "power"]  # what a measurement leaves the next to start from (:func:`carried`)


class Eigenpairs(NamedTuple):
    """Eigenvalues in descending order, unit eigenvectors as columns, and the HVPs spent.

    ``residuals`` are per pair, ||H v - theta v|| / |theta|. :func:`lobpcg` also reports, per pair,
    the index of its cluster (``clusters``, 0 for the top one) and that cluster's subspace residual
    ||H Q - Q Q^T H Q||_F / min |theta| over its Ritz vectors Q in the block (``subspace_residuals``,
    >= the pair's own residual; see :func:`lobpcg`); without ``cluster`` every pair is its own cluster.
    """

    values: Float[Array, " k"]
    vectors: Float[Array, "d k"]
    hvps: Array
    residuals: Float[Array, " k"]
    subspace_residuals: Float[Array, " k"] | None = None
    clusters: Array | None = None  # (k,) int32
    images: Float[Array, "d k"] | None = None  # H v of each vector (lobpcg's, at no HVP: see power_step)


def _orthonormalize(vectors: Array) -> Array:
    q, r = jnp.linalg.qr(vectors)
    return q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)  # deterministic signs


def _rayleigh_ritz(basis: Array, image: Array, k: int) -> tuple[Array, Array]:
    """Top-k Ritz pairs of the operator on span(basis), given image = H @ basis.

    The basis need not be orthonormal or even independent: its Gram matrix is diagonalized and
    directions with relative weight below sqrt(eps) are dropped (their Ritz values are sent to
    -inf), which keeps float32 LOBPCG stable when the search directions degenerate.
    """
    gram = basis.T @ basis
    gram = 0.5 * (gram + gram.T)
    weights, rotation = jnp.linalg.eigh(gram)
    keep = weights > jnp.finfo(basis.dtype).eps ** 0.5 * jnp.max(weights)
    whiten = rotation * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, weights, 1.0)), 0.0)
    reduced = whiten.T @ (basis.T @ image) @ whiten
    reduced = 0.5 * (reduced + reduced.T)
    scale = jnp.max(jnp.abs(reduced)) + 1.0
    reduced = reduced - jnp.diag(jnp.where(keep, 0.0, 4.0 * scale))
    values, coefficients = jnp.linalg.eigh(reduced)
    top = jnp.argsort(-values)[:k]
    return values[top], whiten @ coefficients[:, top]


def lobpcg(
    matvec: BlockMatvec,
    initial: Float[Array, "d k"],
    tol: float = 1e-4,
    max_iters: int = 50,
    guard: int = 1,
    extra: Float[Array, "d e"] | None = None,
    cluster: float | None = None,
) -> Eigenpairs:
    """Top-k eigenpairs of a symmetric operator by locally optimal block preconditioned CG.

    Iterates Rayleigh-Ritz on span[X, R, P] (iterates, residuals, previous directions) until
    every pair satisfies ||H x - theta x|| <= tol * |theta|, or ``max_iters`` iterations.
    ``initial`` (d x k) warm-starts the iteration; ``extra`` (d x e) adds directions to the first
    Rayleigh-Ritz (e more HVPs). Soft locking: only the residuals of unconverged pairs are
    multiplied by H (each iteration costs one HVP per unconverged pair). ``guard`` more Ritz vectors
    are kept in X and P (their images are combinations of known ones: no HVPs), so that the k-th
    pair is not at the edge of the subspace. The HVP count is returned.

    With ``cluster = c``, Ritz values theta_1 >= ... >= theta_{k+guard} split into clusters where
    theta_{i-1} - theta_i > c |theta_{i-1}|, and the contract is on the invariant subspace of each
    cluster that holds a reported pair, guard members included: ||H Q - Q Q^T H Q||_F <= tol
    min |theta| for its Ritz vectors Q (basis-free, and >= each member's own residual, so every
    reported pair still meets the per-pair contract). The members of an unconverged cluster whose
    residual exceeds tol min|theta| / sqrt(|cluster|) are multiplied by H (guard members too).
    """
    if isinstance(cluster, int | float) and not 0 <= cluster < 1:
        raise ValueError(f"lobpcg: cluster is a relative gap in [0, 1) (or None), got {cluster!r}")
    d, k = initial.shape
    start = initial if extra is None else jnp.concatenate([initial, extra], axis=1)
    width = min(k + guard, d)  # Ritz vectors kept: k reported + guard
    searched = k if cluster is None else width  # the columns that may get a residual direction
    x = _orthonormalize(start)
    hx = leading_columns(matvec, x, x.shape[1])
    theta, coefficients = _rayleigh_ritz(x, hx, width)
    x, hx = _pad_columns(x @ coefficients, width), _pad_columns(hx @ coefficients, width)
    theta = _pad_columns(theta[None, :], width)[0]

    def residual_norms(x, hx, theta):
        return jnp.linalg.norm(hx - x * theta, axis=0) / jnp.maximum(jnp.abs(theta), 1e-30)

    def unconverged(theta, residuals):
        """(columns that get a residual direction (searched,), clusters (width,), subspace residuals (width,))."""
        if cluster is None:
            return residuals[:k] > tol, jnp.arange(width), residuals
        ids = cluster_indices(theta, cluster)
        subspace, scale, size = _cluster_residuals(residuals * jnp.maximum(jnp.abs(theta), 1e-30), theta, ids)
        in_scope = ids <= ids[k - 1]
        behind = residuals * jnp.maximum(jnp.abs(theta), 1e-30) > tol * scale / jnp.sqrt(size)
        return in_scope & (subspace > tol) & behind, ids, subspace

    def not_done(carry):
        theta, residuals, iteration = carry[4], carry[5], carry[6]
        return jnp.logical_and(iteration < max_iters, jnp.any(unconverged(theta, residuals)[0]))

    def iterate(carry):
        x, hx, p, hp, theta, residuals, iteration, hvps = carry
        active = unconverged(theta, residuals)[0]
        order = jnp.argsort(~active, stable=True)  # unconverged pairs first
        count = jnp.sum(active)
        r = (hx[:, :searched] - x[:, :searched] * theta[:searched])[:, order] * (jnp.arange(searched) < count)
        r = r - x @ (x.T @ r)
        r = r / jnp.maximum(jnp.linalg.norm(r, axis=0), jnp.finfo(r.dtype).tiny)
        hr = leading_columns(matvec, r, jnp.maximum(count, 1))
        basis = jnp.concatenate([x, r, p], axis=1)
        image = jnp.concatenate([hx, hr, hp], axis=1)
        theta, coefficients = _rayleigh_ritz(basis, image, width)
        new_x, new_hx = basis @ coefficients, image @ coefficients
        p, hp = basis[:, width:] @ coefficients[width:], image[:, width:] @ coefficients[width:]
        # renormalize to the unit sphere (the Ritz vectors are orthonormal up to rounding)
        norms = jnp.linalg.norm(new_x, axis=0)
        norms = jnp.where(norms > 0, norms, 1.0)
        new_x, new_hx = new_x / norms, new_hx / norms
        residuals = residual_norms(new_x[:, :searched], new_hx[:, :searched], theta[:searched])
        return new_x, new_hx, p, hp, theta, residuals, iteration + 1, hvps + count

    zeros = jnp.zeros_like(x)
    carry = (
        x,
        hx,
        zeros,
        zeros,
        theta,
        residual_norms(x[:, :searched], hx[:, :searched], theta[:searched]),
        jnp.asarray(0),
        jnp.asarray(start.shape[1]),
    )
    x, hx, _, _, theta, residuals, _, hvps = jax.lax.while_loop(not_done, iterate, carry)
    _, ids, subspace = unconverged(theta, residuals)
    return Eigenpairs(theta[:k], x[:, :k], hvps, residuals[:k], subspace[:k], ids[:k].astype(jnp.int32), hx[:, :k])


def cluster_indices(theta: Float[Array, " w"], gap: float) -> Array:
    """Cluster index of each of descending values theta (0 for the top cluster): a new cluster
    starts wherever theta_{i-1} - theta_i > gap |theta_{i-1}|."""
    breaks = theta[:-1] - theta[1:] > gap * jnp.abs(theta[:-1])
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(breaks, dtype=jnp.int32)])


def _cluster_residuals(norms: Array, theta: Array, ids: Array) -> tuple[Array, Array, Array]:
    """Per Ritz pair, its cluster's (||H Q - Q Theta||_F / min |theta|, min |theta|, size), from the
    pairs' residual norms ||H q - theta q|| (the columns of H Q - Q Theta for the Ritz vectors Q)."""
    same = ids[:, None] == ids[None, :]
    scale = jnp.maximum(jnp.min(jnp.where(same, jnp.abs(theta)[None, :], jnp.inf), axis=1), 1e-30)
    return jnp.sqrt(same.astype(norms.dtype) @ norms**2) / scale, scale, jnp.sum(same, axis=1)


def leading_columns(matvec: BlockMatvec, block: Float[Array, "d k"], count: Array | int) -> Float[Array, "d k"]:
    """[A b_1, ..., A b_m, 0, ..., 0] for the first m = ``count`` columns of ``block`` (m may be traced)."""
    return column_loop(
        lambda j: matvec(jax.lax.dynamic_slice_in_dim(block, j, 1, axis=1))[:, 0], count, jnp.zeros_like(block)
    )


def column_loop(column: Callable[[Array], Array], count: Array | int, out: Float[Array, "d k"]) -> Float[Array, "d k"]:
    """``out`` with its column j replaced by ``column(j)`` for j < ``count`` (m may be traced).

    One column per iteration of one loop: the column's graph (an HVP, a third derivative) is traced
    and compiled once whatever m, where a branch per m, or a batch of each width, compiles a copy
    each; and exactly m columns are computed.
    """

    def body(j, out):
        return jax.lax.dynamic_update_slice_in_dim(out, column(j)[:, None].astype(out.dtype), j, axis=1)

    return jax.lax.fori_loop(0, count, body, out)


def _pad_columns(a: Array, width: int) -> Array:
    """``a`` with zero columns appended (or cut) to ``width`` columns."""
    if a.shape[1] >= width:
        return a[:, :width]
    return jnp.concatenate([a, jnp.zeros((a.shape[0], width - a.shape[1]), a.dtype)], axis=1)


def hessian_eigenpairs(
    objective: Objective,
    w: Array,
    initial: Array,
    tol: float = 1e-4,
    max_iters: int = 50,
    guard: int = 1,
    preconditioner: Array | None = None,
    cluster: float | None = None,
) -> Eigenpairs:
    """Top eigenpairs of H(w) by LOBPCG, warm-started from ``initial`` (d x k); with a positive
    diagonal ``preconditioner`` P (d,), those of P^{-1/2} H(w) P^{-1/2} (the eigenvalues of P^{-1} H)."""
    _, matvec = linearized_hessian(objective.grad, lambda hvp: hvp, w)
    return solve_from(matvec, initial, tol, max_iters, guard, preconditioner, cluster)


def linearized_hessian(function: Callable, hvp_of: Callable, w: Array) -> tuple[Any, BlockMatvec]:
    """(function(w), V -> H(w) V) from one linearization of ``function`` (g, or (L, g)) at w, whose
    tangent ``hvp_of`` reads as H v."""
    primal, linear = jax.linearize(function, w)
    return primal, jax.vmap(lambda v: hvp_of(linear(v)), in_axes=1, out_axes=1)


def solve_from(matvec: BlockMatvec, initial: Array, tol, max_iters, guard, preconditioner, cluster) -> Eigenpairs:
    """:func:`lobpcg` of H (``matvec``) or, given a diagonal ``preconditioner`` P, of P^{-1/2} H P^{-1/2}."""
    if preconditioner is not None:
        matvec = preconditioned_matvec(matvec, preconditioner)
    return lobpcg(matvec, initial, tol=tol, max_iters=max_iters, guard=guard, cluster=cluster)


def unmeasured(values: Float[Array, " k"], vectors: Float[Array, "d k"], residuals: Float[Array, " k"]) -> Eigenpairs:
    """The pairs of a step without a measurement (the same fields as :func:`lobpcg`'s): 0 HVPs,
    NaN subspace residuals, every pair its own cluster, and the vectors as their own images."""
    k = vectors.shape[1]
    nan = jnp.full((k,), jnp.nan, dtype=vectors.dtype)
    ids = jnp.arange(k, dtype=jnp.int32)
    return Eigenpairs(values, vectors, jnp.asarray(0, jnp.int32), residuals, nan, ids, vectors)


def power_step(pairs: Eigenpairs) -> Float[Array, "d k"]:
    """Each vector moved by one power step, H v / |H v| (its sign kept), from the images :func:`lobpcg` returns:
    no HVP. Along an eigenvector of eigenvalue lambda the component of v is scaled by lambda / theta relative to
    the top, so a warm start from these carries less of the measurement's tol-level error along the bulk
    (|lambda| << theta) than v itself; components with |lambda| > theta (a negative eigenvalue larger than the
    top) would grow, and the next measurement removes them as from any start."""
    moved = pairs.vectors if pairs.images is None else pairs.images  # an oracle's pairs carry no images
    norms = jnp.linalg.norm(moved, axis=0)
    sign = jnp.where(jnp.sum(moved * pairs.vectors, axis=0) < 0, -1.0, 1.0)
    usable = jnp.isfinite(norms) & (norms > 0) & (jnp.asarray(pairs.hvps) > 0)  # unmeasured: carried bitwise
    return jnp.where(usable, moved * (sign / jnp.where(usable, norms, 1.0)), pairs.vectors)


def carried(pairs: Eigenpairs, carry: Carry, previous: Array | None = None) -> Float[Array, "d k"]:
    """What a measurement leaves its next one to start from (a discrete optimizer's ``spectrum.carry``, a tracker's
    ``carry``): the pairs' Ritz vectors ("ritz"), or each moved by :func:`power_step` ("power"); ``previous`` (the
    last ones carried) where those are not finite, so that one measurement with a NaN or inf product does not
    make every later one NaN. An optimizer's iterates never read them."""
    vectors = power_step(pairs) if carry == "power" else pairs.vectors
    return vectors if previous is None else jnp.where(jnp.all(jnp.isfinite(vectors)), vectors, previous)


def random_vectors(key: Array, dim: int, k: int, dtype=jnp.float32) -> Array:
    """min(k, dim) orthonormal random directions in R^dim (columns)."""
    return _orthonormalize(jax.random.normal(key, (dim, min(k, dim)), dtype=dtype))


def grow_tracked(vectors: Array, values: np.ndarray, threshold: float, k_max: int, key: Array) -> Array:
    """Add a direction when every tracked eigenvalue is above ``threshold`` (and k < k_max).

    The tracker always keeps one eigenvalue below the threshold as a sentinel: when the sentinel
    crosses, a new random direction (orthogonal to the tracked ones) becomes the next sentinel.
    """
    k = vectors.shape[1]
    if k >= min(k_max, vectors.shape[0]) or not np.all(np.asarray(values) > threshold):
        return vectors
    fresh = jax.random.normal(key, (vectors.shape[0], 1), dtype=vectors.dtype)
    fresh = fresh - vectors @ (vectors.T @ fresh)
    return jnp.concatenate([vectors, fresh / jnp.linalg.norm(fresh)], axis=1)


# ---- host-side solvers: one-off measurements, baselines and oracles ---------------------------


class _CountingOperator(scipy.sparse.linalg.LinearOperator):
    def __init__(self, objective: Objective, w: Array):
        self._objective = objective
        self._w = w
        self.calls = 0
        super().__init__(dtype=np.dtype(w.dtype), shape=(w.size, w.size))

    def _matvec(self, v):
        self.calls += 1
        return np.asarray(compiled.hvp(self._objective, self._w, jnp.asarray(v.ravel(), dtype=self._w.dtype)))


def lanczos(objective: Objective, w: Array, k: int = 1, tol: float = 0.0, seed: int = 0) -> Eigenpairs:
    """Top-k (largest algebraic) eigenpairs of H(w) by ARPACK's implicitly restarted Lanczos."""
    operator = _CountingOperator(objective, w)
    start = np.random.default_rng(seed).standard_normal(w.size)
    values, vectors = scipy.sparse.linalg.eigsh(operator, k=k, which="LA", tol=tol, v0=start)
    order = np.argsort(-values)
    values, vectors = values[order], vectors[:, order]
    residuals = _relative_residuals(objective, w, values, vectors)
    return Eigenpairs(values, vectors, operator.calls, residuals)  # type: ignore[arg-type]  # numpy oracle: host arrays


def power_iteration(
    objective: Objective, w: Array, tol: float = 1e-3, max_iters: int = 100, seed: int = 0
) -> Eigenpairs:
    """Largest-magnitude eigenpair by power iteration, stopped when the eigenvalue estimate's
    relative change falls below ``tol`` (PyHessian's criterion)."""
    start = np.random.default_rng(seed).standard_normal(w.size)
    v = jnp.asarray(start / np.linalg.norm(start), dtype=w.dtype)
    value, calls = None, 0
    for _ in range(max_iters):
        hv = compiled.hvp(objective, w, v)
        calls += 1
        new_value = float(jnp.vdot(v, hv))
        v = hv / jnp.linalg.norm(hv)
        if value is not None and abs(new_value - value) <= tol * (abs(value) + 1e-12):
            value = new_value
            break
        value = new_value
    vectors = np.asarray(v)[:, None]
    residuals = _relative_residuals(objective, w, np.array([value]), vectors)
    return Eigenpairs(np.array([value]), vectors, calls, residuals)  # type: ignore[arg-type]  # numpy oracle: host arrays


def top_hessian_eigenpairs(dense_up_to: int, objective: Objective, w: Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of H(w) on the host: the dense Hessian's for d <= ``dense_up_to`` (or k >= d - 1, where
    ARPACK cannot run), else ARPACK's Lanczos at tol 0."""
    dense = k >= w.size - 1 or w.size <= dense_up_to
    pairs = dense_top_eigenpairs(objective, w, k) if dense else lanczos(objective, w, k=k)
    return np.asarray(pairs.values, float), np.asarray(pairs.vectors, float)


def dense_hessian(objective: Objective, w: Array, block: int = 256) -> np.ndarray:
    """The dense Hessian, column blocks of H(w) I by one linearization of the gradient."""
    d = w.size
    hessian = np.empty((d, d), dtype=np.float64)
    for start in range(0, d, block):
        columns = np.zeros((d, block), dtype=np.dtype(w.dtype))
        width = min(block, d - start)
        columns[start + np.arange(width), np.arange(width)] = 1.0
        block_columns = np.asarray(compiled.hvp_batch(objective, w, jnp.asarray(columns)))
        hessian[:, start : start + width] = block_columns[:, :width]
    return 0.5 * (hessian + hessian.T)


def dense_top_eigenpairs(objective: Objective, w: Array, k: int = 1) -> Eigenpairs:
    """The oracle: top-k eigenpairs of the dense Hessian by LAPACK's symmetric eigensolver.

    Exact to float64 rounding when the objective is built in float64 (``dtype = "float64"``).
    """
    hessian = dense_hessian(objective, jnp.asarray(w))
    d = hessian.shape[0]
    values, vectors = scipy.linalg.eigh(hessian, subset_by_index=[d - min(k, d), d - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    residuals = np.linalg.norm(hessian @ vectors - vectors * values, axis=0) / np.abs(values)
    return Eigenpairs(values, vectors, 0, residuals)  # type: ignore[arg-type]  # numpy oracle: host arrays


def _relative_residuals(objective: Objective, w: Array, values, vectors) -> np.ndarray:
    hv = np.asarray(compiled.hvp_batch(objective, w, jnp.asarray(vectors, dtype=w.dtype)))
    return np.linalg.norm(hv - vectors * values, axis=0) / np.maximum(np.abs(values), 1e-30)


# ---- tracking inside a jitted step ----------------------------------------------------------


def pad_values(values: Array, k_max: int) -> Array:
    """Eigenvalues padded with NaN to a fixed length k_max (so chunks of any k stack)."""
    return jnp.concatenate([values, jnp.full((k_max - values.shape[0],), jnp.nan, values.dtype)])


def last_measured(eigenvalues: np.ndarray) -> np.ndarray | None:
    """The most recent row of a (steps x k) eigenvalue record that has a measurement."""
    rows = np.flatnonzero(np.isfinite(np.asarray(eigenvalues)[:, 0]))
    return None if rows.size == 0 else np.asarray(eigenvalues)[rows[-1]]


def measured_row(pairs: Eigenpairs, spectrum) -> dict:
    """The row fields of any measurement: ``eigenvalues`` (padded to k_max), ``hvps`` (the solver's; a
    process adds its own), ``measurement_hvps`` (the solver's alone) and ``residual`` (the largest)."""
    return {
        "eigenvalues": pad_values(pairs.values, spectrum.k_max),
        "hvps": jnp.asarray(pairs.hvps, jnp.int32),
        "measurement_hvps": jnp.asarray(pairs.hvps, jnp.int32),
        "residual": jnp.max(pairs.residuals),
    }


def tracked_row(pairs: Eigenpairs, lr, spectrum) -> dict:
    """The row fields of a measurement of H's top pairs: ``sharpness`` (theta_1), ``lr_sharpness`` (lr theta_1)
    and :func:`measured_row`'s."""
    sharpness = pairs.values[0]
    return {"sharpness": sharpness, "lr_sharpness": lr * sharpness, **measured_row(pairs, spectrum)}


def value_grad_and_eigenpairs(
    objective: Objective, w: Array, initial: Array, spectrum
) -> tuple[tuple[Array, Array], Eigenpairs]:
    """((L(w), g(w)), the top eigenpairs of H(w) by LOBPCG warm-started from ``initial``, per the
    ``[spectrum]`` spec) from one linearization of (L, g): the solver's HVPs are that linearization's
    products, and (L, g) its primal value, which a process stepping from w needs anyway."""
    value, matvec = linearized_value_and_grad(objective, w)
    return value, solve_spectrum(matvec, initial, spectrum)


def linearized_value_and_grad(objective: Objective, w: Array) -> tuple[tuple[Array, Array], BlockMatvec]:
    """((L(w), g(w)), V -> H(w) V) from one linearization of (L, g) at w."""
    return linearized_hessian(objective.value_and_grad, lambda tangent: tangent[1], w)


def solve_spectrum(matvec: BlockMatvec, initial: Array, spectrum, preconditioner: Array | None = None) -> Eigenpairs:
    """:func:`solve_from` with every setting of the ``[spectrum]`` spec (tol, max_iters, guard, cluster)."""
    return solve_from(
        matvec, initial, spectrum.tol, spectrum.max_iters, spectrum.guard, preconditioner, spectrum.cluster or None
    )


def value_grad_and_tracked(
    objective: Objective,
    w: Array,
    vectors: Array,
    step: Array,
    spectrum,
    start: Callable[[tuple[Array, Array]], Array] | None = None,
    preconditioner: Callable[[Array], Array] | None = None,
    otherwise: Callable[[Array], tuple[Array, Array]] | None = None,
) -> tuple[tuple[Array, Array], Eigenpairs]:
    """((L(w), g(w)), the tracked eigenpairs at steps that are multiples of ``spectrum.every``): a discrete
    optimizer's gradient and measurement from one linearization of (L, g) on a measured step.

    On a measured step the solver runs on H, or on P^{-1/2} H P^{-1/2} for P = ``preconditioner(g)``, from
    ``start((L, g))`` (default: ``vectors``): a start or a P that reads the step's gradient takes it from the
    linearization's primal. The other steps (a ``lax.cond`` on ``step % every``) do not linearize (whose
    primal would also compute the tangent's residuals): (L, g) is ``otherwise(w)`` (default:
    ``objective.value_and_grad``) and the pairs are :func:`unmeasured` (NaN values, ``vectors`` carried).
    """
    k = vectors.shape[1]

    def measure(_):
        value, matvec = linearized_value_and_grad(objective, w)
        initial = vectors if start is None else start(value)
        scale = None if preconditioner is None else preconditioner(value[1])
        pairs = solve_spectrum(matvec, initial, spectrum, scale)
        return value, pairs._replace(hvps=jnp.asarray(pairs.hvps, jnp.int32))

    def skip(_):
        nan = jnp.full((k,), jnp.nan, dtype=vectors.dtype)
        return (objective.value_and_grad if otherwise is None else otherwise)(w), unmeasured(nan, vectors, nan)

    if spectrum.every == 0:
        return skip(None)
    if spectrum.every == 1:
        return measure(None)
    return jax.lax.cond(step % spectrum.every == 0, measure, skip, None)
