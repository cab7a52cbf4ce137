"""A live, warm-started sharpness tracker for the user's own training loop (optax style).

    tracker = eosflow.SharpnessTracker(loss_fn, k=3, tol=1e-3)       # loss_fn(params, batch)
    state = tracker.init(params, key)
    state, eig = tracker.update(state, params, batch)                 # jittable, scannable

``eig.values`` are the top-k eigenvalues of the Hessian H of ``loss_fn(., batch)`` at ``params``
(descending), ``eig.vectors`` their unit eigenvectors (d x k, in the order of
``jax.flatten_util``-style flattening of ``params``), ``eig.residuals`` the relative residuals
||H v - lambda v|| / |lambda| (each <= tol unless ``max_iters`` ran out) and ``eig.hvps`` the
Hessian-vector products spent. Each update warm-starts :func:`eosflow.spectrum.lobpcg` from
the previous eigenvectors, so tracking a slowly moving spectrum costs a few HVPs per step.

Given ``preconditioner=P`` (P's diagonal, a pytree like ``params`` or a flat vector, e.g. from
:mod:`eosflow.optimizer_edges`), the eigenvalues are those of P^{-1/2} H P^{-1/2}, the
preconditioned sharpness that adaptive optimizers hold at ``edge_threshold``.

With ``every = N`` the solver runs on every N-th update only (``lax.cond``); the other updates
return the last measurement with ``hvps = 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from eosflow.objective import ravel
from eosflow.preconditioning import preconditioned_matvec
from eosflow.spectrum import Eigenpairs, lobpcg, random_vectors

PyTree = Any


class TrackerState(NamedTuple):
    """The warm start and the last measurement (d parameters, k tracked eigenpairs)."""

    vectors: Float[Array, "d k"]  # eigenvectors of the last measurement (random before the first)
    values: Float[Array, " k"]  # eigenvalues of the last measurement (NaN before the first)
    residuals: Float[Array, " k"]  # their relative residuals (NaN before the first)
    count: Array  # type: ignore[assignment]  # updates so far (int32); the field shadows tuple.count
    hvps: Array  # Hessian-vector products spent so far (int32)


class SharpnessTracker(eqx.Module):
    """Top-k eigenpairs of the Hessian of ``loss_fn`` (optionally preconditioned), warm-started.

    Attributes:
        loss_fn: ``loss_fn(params, batch) -> scalar``, or ``loss_fn(params)`` when updates pass no batch.
        k: eigenpairs tracked.
        tol: relative residual ||H v - lambda v|| / |lambda| accepted for every pair.
        max_iters: LOBPCG iterations at most per measurement.
        every: measure on every ``every``-th update (the first update always measures).
        cluster: relative gap below which Ritz values form a cluster whose invariant subspace is
            converged as a whole (:func:`eosflow.spectrum.lobpcg`; None: per pair). Skipped updates
            report NaN subspace residuals.
    """

    loss_fn: Callable = eqx.field(static=True)
    k: int = eqx.field(static=True, default=3)
    tol: float = eqx.field(static=True, default=1e-3)
    max_iters: int = eqx.field(static=True, default=30)
    every: int = eqx.field(static=True, default=1)
    cluster: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.k < 1 or self.max_iters < 1 or self.every < 1:
            raise ValueError(
                f"SharpnessTracker needs k, max_iters, every >= 1 (got {self.k}, {self.max_iters}, {self.every})"
            )
        if not 0 < self.tol < 1:
            raise ValueError(f"SharpnessTracker tol must be in (0, 1), got {self.tol!r}")
        if self.cluster is not None and not 0 <= self.cluster < 1:
            raise ValueError(f"SharpnessTracker cluster must be in [0, 1) or None, got {self.cluster!r}")

    def init(self, params: PyTree, key: Array) -> TrackerState:
        """k random orthonormal directions in parameter space; no measurement yet."""
        flat, _ = ravel(params)
        vectors = random_vectors(key, flat.size, self.k, flat.dtype)
        nan = jnp.full((vectors.shape[1],), jnp.nan, flat.dtype)
        zero = jnp.zeros((), jnp.int32)
        return TrackerState(vectors, nan, nan, zero, zero)

    def update(
        self, state: TrackerState, params: PyTree, batch: PyTree = None, preconditioner: PyTree = None
    ) -> tuple[TrackerState, Eigenpairs]:
        """Measure at ``params`` (on ``batch``), warm-started from ``state``; skip unless count % every == 0."""
        flat, unravel = ravel(params)
        precondition = None if preconditioner is None else ravel(preconditioner)[0].astype(flat.dtype)

        def loss(w):
            return self.loss_fn(unravel(w)) if batch is None else self.loss_fn(unravel(w), batch)

        def measure(state: TrackerState) -> Eigenpairs:
            _, hvp = jax.linearize(jax.grad(loss), flat)
            matvec = jax.vmap(hvp, in_axes=1, out_axes=1)
            if precondition is not None:
                matvec = preconditioned_matvec(matvec, precondition)
            pairs = lobpcg(matvec, state.vectors, tol=self.tol, max_iters=self.max_iters, cluster=self.cluster)
            return pairs._replace(hvps=jnp.asarray(pairs.hvps, jnp.int32))

        def skip(state: TrackerState) -> Eigenpairs:
            nan, clusters = jnp.full_like(state.residuals, jnp.nan), jnp.arange(state.residuals.size, dtype=jnp.int32)
            return Eigenpairs(state.values, state.vectors, jnp.zeros((), jnp.int32), state.residuals, nan, clusters)

        if self.every == 1:
            pairs = measure(state)
        else:
            pairs = jax.lax.cond(state.count % self.every == 0, measure, skip, state)
        new_state = TrackerState(pairs.vectors, pairs.values, pairs.residuals, state.count + 1, state.hvps + pairs.hvps)
        return new_state, pairs
