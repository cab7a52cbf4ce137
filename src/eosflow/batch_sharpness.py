"""Batch sharpness: the curvature of a minibatch's own loss along the step taken on it (SGD's edge).

A step w -> w - lr s on a minibatch B changes that batch's loss (regularized by lam |w|^2 / 2) by

    L_B(w - lr s) - L_B(w) = -lr (g_B + lam w)^T s + lr^2 / 2 s^T (H_B + lam I) s + O(lr^3 |s|^3),

so the step lowers it to second order iff  q_B = s^T (H_B + lam I) s / ((g_B + lam w)^T s) < 2 / lr. For plain
SGD (s = g_B) q_B = g_B^T H_B g_B / |g_B|^2; with heavy-ball momentum s is the buffer. Andreyev & Beneventano
(arXiv:2412.20553, "Edge of Stochastic Stability") call its mean over batches, E_B[g_B^T H_B g_B / |g_B|^2]
("the expected directional curvature of mini-batch Hessians along their stochastic gradients"), *batch
sharpness*, and report that minibatch SGD trains where it is 2/lr while the full-batch sharpness stays below
(their code also offers the ratio of means E_B[g^T H g] / E_B[|g|^2]). eosflow records the numerator and the
denominator apart (``curvature``, ``descent``), so that either can be formed: :func:`batch_sharpness` at one
point, SGD's ``batch_sharpness_every`` along a run. (The quotient for momentum and weight decay is ours, from
the expansion above; the paper's code has the same momentum form.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from eosflow.objective import check_loss_call, differentiable_part, ravel

PyTree = Any


class BatchQuotient(NamedTuple):
    """One batch's s^T (H_B + lam I) s and (g_B + lam w)^T s (scalars, or one per batch; NumPy from torch)."""

    curvature: Array | np.ndarray
    descent: Array | np.ndarray

    @property
    def value(self) -> Array | np.ndarray:
        """q_B = curvature / descent: the step lowers its own batch's loss (to second order) iff lr q_B < 2."""
        return self.curvature / self.descent

    def standard_error(self) -> float:
        """The standard error of batch sharpness, the mean of n quotients of independently drawn batches:
        std(q_B, ddof=1) / sqrt(n) (NaN for one batch)."""
        q = np.asarray(self.value, dtype=float).ravel()
        return float(np.std(q, ddof=1) / np.sqrt(q.size)) if q.size > 1 else float("nan")


def batch_quotient(
    batch_hvp: Callable[[Array], Array],
    w: Float[Array, " d"],
    gradient: Float[Array, " d"],
    step: Float[Array, " d"],
    weight_decay: float = 0.0,
) -> BatchQuotient:
    """(s^T (H_B + lam I) s, (g_B + lam w)^T s) with ``batch_hvp`` (v -> H_B(w) v) at ``w``; ``gradient`` is
    g_B(w), ``step`` the direction s (the step is w - lr s)."""
    curvature_along = batch_hvp(step) + weight_decay * step
    return BatchQuotient(jnp.vdot(step, curvature_along), jnp.vdot(gradient + weight_decay * w, step))


def batch_sharpness(
    loss_fn: Callable[[PyTree, PyTree], Array], params: PyTree, batches: PyTree, wrt: Any = None
) -> tuple[Array, BatchQuotient]:
    """Batch sharpness E_B[g_B^T H_B g_B / |g_B|^2], the mean of the batches' quotients, over ``batches``: a list
    of batches (each what ``loss_fn(params, .)`` takes; the torch function's form) or a pytree whose leaves stack
    them on a leading axis (``batches[i]`` one batch). Each batch is taken along its own gradient, as a plain
    SGD step; returns the value with every batch's numerator and denominator (their ratio of sums,
    ``quotients.curvature.sum() / quotients.descent.sum()``, is the other estimate). ``params`` is a pytree of
    floating arrays (flattened leaf by leaf) or an Equinox or Flax NNX module (its differentiable part, as the
    tracker measures it; ``wrt`` another part, as the tracker's). One gradient and one Hessian-vector product
    per batch, vectorized over stacked batches (a list of batches of different shapes is taken one by one)."""
    check_loss_call(loss_fn, batches, "batch_sharpness")
    arrays, rebuild = differentiable_part(params, wrt)
    flat, unravel = ravel(arrays)
    flat = jnp.asarray(flat)

    def one(batch: PyTree) -> BatchQuotient:
        def grad(w: Array) -> Array:
            return jax.grad(lambda v: loss_fn(rebuild(unravel(v)), batch))(w)

        gradient, hvp = jax.linearize(grad, flat)  # g_B and v -> H_B v from one pass
        return batch_quotient(hvp, flat, gradient, gradient)

    if isinstance(batches, list):
        if not batches:
            raise ValueError("batch_sharpness needs at least one batch")
        layouts = {jax.tree.structure(batch) for batch in batches}
        shapes = {tuple(jnp.shape(leaf) for leaf in jax.tree.leaves(batch)) for batch in batches}
        if len(layouts) > 1:
            raise ValueError(
                f"batch_sharpness: the batches of the list differ in structure ({sorted(map(str, layouts))})"
            )
        if len(shapes) > 1:  # batches of different sizes: one at a time
            each = [one(batch) for batch in batches]
            quotients = BatchQuotient(*(jnp.stack(parts) for parts in zip(*each)))
            return jnp.mean(quotients.value), quotients
        batches = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)
    counts = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batches)}
    if len(counts) != 1 or None in counts:
        raise ValueError(
            "batch_sharpness: the leaves of `batches` do not share a leading axis (sizes "
            f"{sorted(str(c) for c in counts)}): pass a list of batches, or stack them on a leading axis"
        )
    if counts == {0}:
        raise ValueError("batch_sharpness needs at least one batch: the stacked batches' leading axis is empty")
    quotients = jax.vmap(one)(batches)
    return jnp.mean(quotients.value), quotients
