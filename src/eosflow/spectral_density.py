"""The whole Hessian spectrum, estimated: its density by stochastic Lanczos quadrature, its trace by Hutchinson.

    H = eosflow.HessianOperator.from_function(loss_fn, params, batch)    # any symmetric LinearOperator
    density = eosflow.spectral_density.stochastic_lanczos(H, order=80, probes=8)
    grid = np.linspace(density.nodes.min(), density.nodes.max(), 400)
    values = density.at(grid, width=0.01 * np.ptp(grid))     # integrates to 1: outliers at the edge, the bulk
    trace, error = eosflow.spectral_density.hutchinson_trace(H, probes=100)

Stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen & Saad 2017; used for neural-network Hessians by
Ghorbani, Krishnan & Xiao 2019 and PyHessian): for a unit probe v, m steps of Lanczos from v give the
tridiagonal T_m = S diag(theta) S^T, and the nodes theta_i with weights tau_i = S_{1i}^2 are the m-point
Gauss quadrature of the measure sum_j (v . u_j)^2 delta(x - lambda_j), exact for every polynomial of degree
< 2m: sum_i tau_i theta_i^p = v^T H^p v. With v uniform on the sphere, E[v^T H^p v] = tr(H^p) / d, so the
mean over probes of sum_i tau_i delta(x - theta_i) estimates the spectral density (1/d) sum_j delta(x -
lambda_j), and ``at`` smooths it with a Gaussian of std ``width``. Lanczos runs in float64 on the host with
full reorthogonalization (each probe's basis, order x d numbers, is kept), the probes in blocks within a
memory bound: each step is one ``H @ V`` of a block's columns. Hutchinson: E[z^T H z] = tr(H) for Rademacher z, reported
with its standard error over the probes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse.linalg


class SpectralDensity(NamedTuple):
    """Gauss quadrature nodes and weights of each probe's spectral measure (probes x order; weights sum to 1
    per probe; a probe whose Krylov space closed early has zero weights past its last node)."""

    nodes: np.ndarray  # (probes, order) Ritz values theta_i of T_m
    weights: np.ndarray  # (probes, order) tau_i = (first component of T_m's eigenvector i)^2
    dimension: int  # d
    hvps: int  # Hessian-vector products spent

    def at(self, grid: np.ndarray, width: float) -> np.ndarray:
        """The density at ``grid``: mean over probes of sum_i tau_i N(x; theta_i, width^2) (integrates to 1)."""
        grid = np.asarray(grid, dtype=np.float64)
        if not width > 0:
            raise ValueError(f"the density's smoothing width must be positive, got {width!r}")
        z = (grid[:, None, None] - self.nodes[None]) / width
        return np.mean(np.sum(self.weights[None] * np.exp(-0.5 * z**2), axis=2), axis=1) / (width * np.sqrt(2 * np.pi))

    def moment(self, power: int) -> float:
        """The estimate of tr(H^p) / d, the p-th moment of the spectral density (exact per probe for p < 2 order)."""
        return float(np.mean(np.sum(self.weights * self.nodes**power, axis=1)))

    def trace(self) -> tuple[float, float]:
        """(d times the first moment, its standard error over the probes): SLQ's estimate of tr(H)."""
        per_probe = self.dimension * np.sum(self.weights * self.nodes, axis=1)
        error = per_probe.std(ddof=1) / np.sqrt(per_probe.size) if per_probe.size > 1 else float("nan")
        return float(per_probe.mean()), float(error)


def _operator(operator) -> scipy.sparse.linalg.LinearOperator:
    linear = scipy.sparse.linalg.aslinearoperator(operator)
    if linear.shape[0] != linear.shape[1]:
        raise ValueError(f"the operator must be square (a Hessian), got shape {linear.shape}")
    return linear


def stochastic_lanczos(
    operator, order: int = 80, probes: int = 8, seed: int = 0, memory: float = 2**31
) -> SpectralDensity:
    """``order`` Lanczos steps from each of ``probes`` random unit vectors: the quadrature of each probe's
    spectral measure (module doc). ``operator``: a symmetric d x d LinearOperator, matrix or
    :class:`eosflow.HessianOperator` (its products counted in ``hvps``). The probes run as blocks, one block
    product per step, as many probes per block as keep the Lanczos bases (8 order d bytes per probe) within
    ``memory`` bytes (2 GiB; at least one probe): the probes are independent, so the blocks change the cost,
    not the result."""
    linear = _operator(operator)
    d = linear.shape[0]
    check_count(order, "order", 1, d)
    check_count(probes, "probes", 1)
    rng = np.random.default_rng(seed)
    starts = rng.standard_normal((d, probes))
    starts /= np.linalg.norm(starts, axis=0)
    width = int(min(probes, max(1, memory // (8 * order * d))))
    blocks = [_lanczos_block(linear, starts[:, i : i + width], order) for i in range(0, probes, width)]
    alpha, beta, steps = (np.concatenate([block[i] for block in blocks], axis=-1) for i in range(3))
    products = sum(block[3] for block in blocks)
    nodes, weights = np.zeros((probes, order)), np.zeros((probes, order))
    for p in range(probes):
        m = int(steps[p])
        theta, vectors = scipy.linalg.eigh_tridiagonal(alpha[:m, p], beta[: m - 1, p])
        nodes[p, :m], weights[p, :m] = theta, vectors[0] ** 2
        nodes[p, m:] = theta[-1]  # zero weight: placed on a real node so that ranges stay within the spectrum
    return SpectralDensity(nodes, weights, d, products)


def _lanczos_block(
    linear: scipy.sparse.linalg.LinearOperator, q: np.ndarray, order: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Lanczos from the unit columns of ``q`` (d x p) together: the tridiagonals' (alpha, beta) (order x p each),
    each column's number of steps (fewer where its Krylov space closed) and the products computed."""
    d, probes = q.shape
    basis = np.zeros((order, d, probes))  # (order, d, probes): each probe's orthonormal Lanczos vectors
    alpha, beta = np.zeros((order, probes)), np.zeros((order, probes))
    alive = np.ones(probes, dtype=bool)  # a probe whose Krylov space closed (beta ~ 0) stops
    steps = np.full(probes, order)
    for j in range(order):
        basis[j] = q
        image = np.array(linear.matmat(q), dtype=np.float64)  # a copy: JAX hands out read-only arrays
        if not np.isfinite(image).all():
            raise ValueError("stochastic_lanczos: the operator's products hold NaN or inf (the parameters or data do?)")
        scale = np.linalg.norm(image, axis=0)  # |H q_j|: what "closed" is relative to (not max |alpha| so far,
        # which let a spectrum spanning 1e9 close a probe while its bulk was unresolved)
        alpha[j] = np.einsum("dp,dp->p", q, image)
        image -= basis[j] * alpha[j]
        if j > 0:
            image -= basis[j - 1] * beta[j - 1]
        for _ in range(2):  # full reorthogonalization, twice (Kahan): the Ritz values stay single
            image -= np.einsum("jdp,jp->dp", basis[: j + 1], np.einsum("jdp,dp->jp", basis[: j + 1], image))
        norm = np.linalg.norm(image, axis=0)
        closed = alive & (norm <= 1e-10 * np.maximum(scale, 1e-300))
        steps[closed] = j + 1
        alive &= ~closed
        if j == order - 1 or not alive.any():
            break
        beta[j] = np.where(alive, norm, 0.0)
        q = np.where(alive, image / np.where(norm > 0, norm, 1.0), 0.0)
    return alpha, beta, steps, (j + 1) * probes


def check_count(value, name: str, low: int, high: int | None = None) -> None:
    """A ValueError naming ``name`` unless ``value`` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low or (high and value > high):
        bounds = f"in [{low}, {high}]" if high else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def hutchinson_trace(operator, probes: int = 100, seed: int = 0, block: int = 16) -> tuple[float, float]:
    """(estimate of tr(H), its standard error): the mean of z^T H z over Rademacher probes z, in blocks of
    ``block`` columns (``probes`` HVPs)."""
    linear = _operator(operator)
    check_count(probes, "probes", 2)  # a standard error needs two
    check_count(block, "block", 1)
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, probes, block):
        z = rng.choice([-1.0, 1.0], size=(linear.shape[0], min(block, probes - start)))
        samples.append(np.einsum("dp,dp->p", z, np.asarray(linear.matmat(z), dtype=np.float64)))
    values = np.concatenate(samples)
    if not np.isfinite(values).all():
        raise ValueError("hutchinson_trace: the operator's products hold NaN or inf (the parameters or data do?)")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))
