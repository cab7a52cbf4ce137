"""The central flow: the smooth trajectory that GD at the edge of stability oscillates around.

    dw/dt = -eta [ g(w) + 1/2 grad_w <Sigma, H(w)> ],   Sigma = U X U^T   (Sigma fixed in the gradient)

U holds the critical Hessian eigenvectors (eigenvalue within ``margin`` of 2/eta) and X >= 0
solves, at every Euler substep of length dt, the semidefinite complementarity problem that keeps
the linearized end-of-substep constraint  A - dt (<G_ij, v(X)>)_ij >= 0  with
A = U^T (2/eta - H) U, G_ij = grad_w (u_i^T H u_j) = D^3 L[u_i, u_j, .] and
v(X) = -eta g - (eta/2) sum_kl X_kl G_kl (see :mod:`eosflow.flows.sdcp` and docs/central_flow.md):

    alpha = A + dt eta (<G_ij, g>)_ij,     beta[X] = dt (eta/2) (<G_ij, sum_kl X_kl G_kl>)_ij.

One step (one unit of time): a warm-started LOBPCG at the centre gives the tracked eigenpairs, and
the linearization of (L, g) whose products it takes gives (L, g) there, the first substep's; the top
m eigenvectors with eigenvalue >= (1 - margin) 2/eta are the critical directions U, held fixed for
the step, and their m(m+1)/2 pair gradients G_ij (jvp-of-HVP products) are computed once, one per
iteration of a loop that compiles D^3 L once and skips the padding
(:func:`eosflow.spectrum.column_loop`). Then n Euler substeps, each with one gradient (but the
first, at the centre: the measurement's) and the SDCP, padded to a fixed size with inactive
directions masked (alpha = 2/eta on them, no coupling), so the whole step has static shapes. The
slack A at a substep's point w_s is re-evaluated there by m HVPs (one linearization of (L, g), the
same loop), except at the centre w_0 itself (the first substep), where the eigensolver's Ritz
vectors give U^T H(w_0) U = diag(theta) (Rayleigh-Ritz) for free. With ``remeasure = false`` no
substep costs an HVP: along the step

    A(w_s) = A(w_0) - (<G_ij, w_s - w_0>)_ij + O(|w_s - w_0|^2),

the same first-order model of H the SDCP already uses within a substep (the next step's
eigensolver measures A afresh); cheaper, but less accurate where a step moves H far (the
leaderboard's mean-field network, docs/central_flow.md). With no critical direction (before
the edge of stability) a substep is gradient flow's: one gradient (none at the centre), no SDCP. With
``max_critical = 1`` this is the projected flow.

The row's Sigma (predicted loss, amplitude) is X averaged over the step's substeps: at the first
substep X also pulls back, within that substep, the overshoot of the critical eigenvalues above
2/eta since the last measurement (X ~ -A/dt), a spike whose weight in a first-substep report grows
with the substep count (docs/central_flow.md, "Which X the row reports").
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.config import option
from eosflow.flows.flow import (
    Flow,
    Measured,
    critical_count,
    padded,
    prediction_row,
    register_flow,
    value_and_grad_at,
)
from eosflow.flows.integrate import Averaged, SubstepOptions, substep_count
from eosflow.flows.sdcp import pair_indices, pair_scale, smat, solve_sdcp, svec
from eosflow.objective import Objective
from eosflow.spectrum import column_loop, leading_columns, tracked_row, value_grad_and_eigenpairs


@dataclasses.dataclass(frozen=True)
class ProjectedFlowOptions(SubstepOptions):
    margin: float = option(
        0.03,
        "an eigenvalue is critical once above (1 - margin) * 2/lr (> 0: at 0, rounding leaves a held eigenvalue "
        "just under 2/lr, free to overshoot)",
        gt=0,
        lt=1,
    )


@dataclasses.dataclass(frozen=True)
class CentralFlowOptions(ProjectedFlowOptions):
    max_critical: int = option(6, "most critical directions (capped by the tracked eigenpairs)", ge=1)
    sdcp_max_iters: int = option(30, "Newton iterations at most per complementarity problem", ge=1)
    remeasure: bool = option(
        True, "re-measure U^T H U by m HVPs at every substep (false: Ritz values moved by the pair gradients)"
    )


class Critical(NamedTuple):
    """The critical directions of one step, held fixed over its substeps."""

    measured: Measured
    count: Array  # type: ignore[assignment]  # shadows tuple.count; m: critical directions (eigenvalue >= (1 - margin) 2/eta), at most max_critical
    complete: Array  # () 1 if a tracked eigenvalue below the threshold shows U is the whole critical set
    vectors: Array  # U (d, m_max): the top m eigenvectors, zero-padded
    scaled: Array  # Gs (m_max (m_max + 1) / 2, d): the scaled pair gradients of U
    centre: Array  # w_0 (d,): the point where U and its Ritz values were measured
    slack: Array  # A(w_0) = 2/eta I - diag(theta) (m_max, m_max): U^T (2/eta - H(w_0)) U, 2/eta on the padding


class CentralFlow(Flow):
    options: CentralFlowOptions = eqx.field(static=True)

    def start(self, w0: Array) -> Array:
        return w0

    def measure(self, z: Array, vectors: Array, step: Array) -> tuple[Array, dict[str, Array], Array, Any]:
        """The tracked eigenpairs at the centre (at every step) and (L, g) there, from one linearization; not
        :meth:`Flow.measure`'s branch on the step (this flow always measures): inlined, as it always was, its
        products round as before."""
        value, pairs = value_grad_and_eigenpairs(self.objective, z, vectors, self.spectrum)
        row = tracked_row(pairs, self.lr, self.spectrum)
        return pairs.vectors, row, row["sharpness"], value

    def prepare(self, w: Array, measured: Measured, step: Array) -> tuple[Array, Critical]:
        threshold = 2.0 / self.lr
        k = measured.vectors.shape[1]
        m_max = min(k, self.options.max_critical)
        m, complete = critical_count(measured.values, (1.0 - self.options.margin) * threshold, m_max, w.size)
        active = jnp.arange(m_max) < m
        critical = measured.vectors[:, :m_max] * active  # the top m eigenvectors, zero-padded
        slack = jnp.diag(threshold - jnp.where(active, measured.values[:m_max], 0.0)).astype(w.dtype)
        if measured.value is None:  # measured elsewhere (e.g. by hand): (L, g) at the centre
            measured = measured._replace(value=self.objective.value_and_grad(w), position=w)
        return w, Critical(measured, m, complete, critical, self.pair_gradients(w, critical, m), w, slack)

    def substeps(self, measured: Measured, critical: Critical) -> Array:
        """Critical directions are held at 2/eta; the stiffest free one sets the substep count."""
        k = measured.values.shape[0]
        stiffest = jnp.max(jnp.where(jnp.arange(k) < critical.count, 2.0 / self.lr, measured.values))
        return substep_count(self.lr, stiffest, self.options)

    def term(self, critical: Critical, n: Array | int):
        return lambda w: self.field(w, critical, 1.0 / n)

    def field(  # type: ignore[override]  # more arguments than Flow.field: term() binds them
        self, w: Array, critical: Critical, dt: Array | float
    ) -> tuple[Array, tuple[Array, Array, Averaged]]:
        """(dw/dt, (L, g, X)) for a substep of length dt (the SDCP linearizes the end of the substep);
        the row reports X averaged over the step's substeps (:class:`Averaged`), see the module doc.

        With no critical direction Sigma = 0 and the field is gradient flow's: one gradient, no
        linearization and no SDCP (a branch taken at run time)."""
        return jax.lax.cond(
            critical.count > 0,
            lambda x: self._constrained_field(x, critical, dt),
            lambda x: self._free_field(x, critical),
            w,
        )

    @staticmethod
    def _at_centre(w: Array, critical: Critical) -> Array:
        """Whether w is the centre, where the step was measured (the first substep)."""
        return jnp.all(w == critical.centre)

    def _free_field(self, w: Array, critical: Critical) -> tuple[Array, tuple[Array, Array, Averaged]]:
        loss, grad = value_and_grad_at(self.objective, critical.measured)(w)
        size = critical.vectors.shape[1]
        return -self.lr * grad, (loss, grad, Averaged(jnp.zeros((size, size), w.dtype)))

    def _constrained_field(
        self, w: Array, critical: Critical, dt: Array | float
    ) -> tuple[Array, tuple[Array, Array, Averaged]]:
        if self.options.remeasure:  # at the centre (the first substep) the eigensolver's Ritz values are U^T H U
            (loss, grad), slack = jax.lax.cond(
                self._at_centre(w, critical),
                lambda _: (critical.measured.value, critical.slack),
                lambda x: self._measured_slack(x, critical),
                w,
            )
        else:
            loss, grad = value_and_grad_at(self.objective, critical.measured)(w)
            slack = critical.slack - smat(critical.scaled @ (w - critical.centre))
        velocity, X = self.sdcp_velocity(grad, slack, critical.scaled, dt)
        return velocity, (loss, grad, Averaged(X))

    def _measured_slack(self, w: Array, critical: Critical) -> tuple[tuple[Array, Array], Array]:
        """((L, g), U^T (2/eta - H(w)) U) by one linearization of (L, g) and m HVPs (one per loop iteration)."""
        U = critical.vectors
        (loss, grad), linear = jax.linearize(self.objective.value_and_grad, w)
        hessian_times = jax.vmap(lambda v: linear(v)[1], in_axes=1, out_axes=1)
        image = leading_columns(hessian_times, U, critical.count)
        slack = (2.0 / self.lr) * jnp.eye(U.shape[1], dtype=w.dtype) - 0.5 * (U.T @ image + image.T @ U)
        return (loss, grad), slack

    def observe(
        self, w: Array, aux: tuple[Array, Array, Averaged], critical: Critical, n: Array | int
    ) -> dict[str, Array]:
        loss, grad, X = aux[0], aux[1], aux[2].value  # X: its mean over the step's substeps
        k, m = critical.measured.vectors.shape[1], critical.count
        sigma_values, sigma_vectors = jnp.linalg.eigh(X)
        sigma_values = jnp.maximum(sigma_values[::-1], 0.0)
        top = jnp.where(sigma_values[0] > 0, critical.vectors @ sigma_vectors[:, -1], critical.measured.vectors[:, 0])
        row = prediction_row(self.lr, loss, grad, padded(sigma_values, k), top, self.spectrum.k_max)
        hvps = (n - 1) * m if self.options.remeasure else jnp.zeros_like(m)  # none at the centre (first substep)
        return {
            **row,
            "critical": m,
            "critical_complete": critical.complete,
            "substeps": n,
            "grads": n - 1,  # the first substep's (L, g) came with the measurement
            "hvps": hvps,
            "third_derivatives": m * (m + 1) // 2,
        }

    def pair_gradients(self, w: Array, critical: Array, m: Array | int | None = None) -> Array:
        """:func:`pair_gradients` of this flow's objective."""
        return pair_gradients(self.objective, w, critical, m)

    def divergence_hint(self, rows: dict[str, np.ndarray]) -> str:
        """The flow lives on {S <= 2/eta}: a centre well outside it, where grad S cannot pull it back
        (e.g. a critical point of S such as the quartic's origin), sends the SDCP multiplier to infinity."""
        measured = np.asarray(rows.get("lr_sharpness", []), dtype=np.float64)
        measured = measured[np.isfinite(measured)]
        if measured.size == 0 or measured.max() <= 2.0 * (1.0 + self.options.margin):
            return ""
        return (
            f"the centre was at lr*S = {measured.max():.4g} > 2, outside the set {{S <= 2/lr}} on which the "
            f"{self.name.replace('_', ' ')} is defined"
        )

    def sdcp_velocity(self, grad: Array, slack: Array, scaled: Array, dt: Array | float) -> tuple[Array, Array]:
        """(dw/dt, X) for an Euler substep of length dt, given the slack A = U^T (2/eta - H) U
        and the scaled pair gradients Gs of U: X solves the SDCP with
        alpha = A + dt eta (<G_ij, g>)_ij and beta = dt (eta/2) Gs Gs^T."""
        lr = self.lr
        alpha = slack + dt * lr * smat(scaled @ grad)
        beta = (0.5 * dt * lr) * (scaled @ scaled.T)
        X = solve_sdcp(alpha, beta, max_iters=self.options.sdcp_max_iters).X
        return -lr * grad - 0.5 * lr * (scaled.T @ svec(X)), X


def pair_gradients(objective: Objective, w: Array, critical: Array, m: Array | int | None = None) -> Array:
    """Gs_p = s_p G_p for the pairs p = (i <= j) of the columns of ``critical`` (p x d), with
    G_ij = D^3 L(w)[u_i, u_j, .] and s_p = sqrt 2 off the diagonal (the svec convention).

    Only the m(m + 1)/2 pairs of the first ``m`` columns are computed, one per iteration of one
    loop (:func:`eosflow.spectrum.column_loop`: D^3 L is compiled once, whatever m); the other
    rows are zero.
    """
    size = critical.shape[1]
    rows, cols = pair_indices(size)
    scale = jnp.asarray(pair_scale(size), w.dtype)
    first, second = critical[:, rows], critical[:, cols]  # d x pairs: u_i and u_j of pair p = (i, j)
    m = size if m is None else m
    pairs = column_loop(
        lambda p: objective.third_derivative(w, first[:, p], second[:, p]),
        m * (m + 1) // 2,
        jnp.zeros((w.size, scale.size), w.dtype),
    )
    return scale[:, None] * pairs.T


register_flow(
    "central_flow",
    CentralFlow,
    CentralFlowOptions,
    "central flow: GD's time-averaged trajectory at the edge of stability (Cohen et al. 2025)",
    every_step=True,
)
