"""The central flow of preconditioned GD (RMSProp, scalar RMSProp): the SDCP on P^{-1/2} H P^{-1/2}, nu included.

With x = P^{1/2} w, RMSProp with P frozen is GD on L(P^{-1/2} x), whose Hessian is P^{-1/2} H P^{-1/2};
its central flow pulled back to w, with nu fed by the oscillation (Cohen, Damian et al. 2025; the
derivation and conventions in docs/adaptive.md):

    dw/dt  = -lr P^{-1} [ D + 1/2 grad_w <Sigma, H> ],        Sigma = V X V^T,  V = P^{-1/2} U
    dnu/dt = c2 ( s(g) + E[s(g + H delta)] - s(g) - nu )   = c2 ( g^2 + diag(H Sigma H) - nu )   (diagonal)
                                                           = c2 ( ||g||^2 + tr(H Sigma H) - nu ) (scalar)

(D relaxes to g as in the stable flow, :mod:`eosflow.flows.moments`, which carries GD's second-order
term; D = g with ``moments = "reference"``, the reference code's choice.)
U: the critical eigenvectors of P^{-1/2} H P^{-1/2} (eigenvalue >= (1 - margin) 2/lr), measured at
the start of each unit of time and held (V is rebuilt from the current P at every substep, so
V^T P V = I). X >= 0 solves, at each Euler substep dt, the complementarity problem keeping the
linearized end-of-substep constraint V^T (2 P / lr - H) V >= 0, in which both H (through w) and P
(through nu) move:

    alpha = A + dt [ lr <G_ij, P^{-1} g> + (2/lr) v_i^T diag(P'(nu) nu_dot_0) v_j ],   A = 2/lr - V^T H V
    beta  = dt [ (lr/2) <G_ij, P^{-1} G_kl> + (2/lr) c2 lam_k lam_l sum_d P' P^2 (v_i v_j)_d (v_k v_l)_d ]

with G_ij = D^3 L[v_i, v_j, .], nu_dot_0 = c2 (s(g) - nu) and, as in the reference code, H v ~ P v lam
(lam = v^T H v) on the critical space; in beta lam_k lam_l is symmetrized to sqrt(lam_i lam_j lam_k lam_l)
(equal on the critical space, where lam = 2/lr), which makes beta a Gram matrix: PSD. Per substep:
one gradient and m HVPs; G is evaluated once per step, at its start, for V there, and held over the
substeps as U is (``pair_gradients = "step"``, as GD's central flow; ``"substep"``, the reference code's,
evaluates it at every substep: m(m+1)/2 third derivatives each). A step with no critical direction (X = 0) is the
stable flow's step, integrated as the stable flow integrates it (``free_method``, RK4 by default): the
flow then follows the optimizer to the same O(lr^2) before the edge, not to an Euler substep's.
Registered as ``rmsprop_central_flow`` (the ``[rmsprop]`` table's ``second_moment`` picks the form).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.flows.central import pair_gradients
from eosflow.flows.flow import Measured, critical_count, position_grads
from eosflow.flows.integrate import STAGES, UPDATES, Averaged, euler, substep_count
from eosflow.flows.moments import (
    MomentFlowOptions,
    OptimizerModel,
    Phase,
    register_models,
)
from eosflow.flows.sdcp import pair_indices, pair_scale, smat, solve_sdcp, svec
from eosflow.spectrum import column_loop


@dataclasses.dataclass(frozen=True)
class PreconditionedCentralOptions(MomentFlowOptions):
    margin: float = option(
        0.03,
        "an eigenvalue of P^-1 H is critical once above (1 - margin) * 2/lr (> 0: at 0, rounding leaves a held "
        "eigenvalue just under 2/lr, free to overshoot)",
        gt=0,
        lt=1,
    )
    max_critical: int = option(6, "most critical directions (capped by the tracked eigenpairs)", ge=1)
    sdcp_max_iters: int = option(30, "Newton iterations at most per complementarity problem", ge=1)
    method: Literal["euler"] = option(
        "euler",
        "euler only: the SDCP keeps the constraint at the end of an Euler substep (steps with a critical direction)",
    )
    pair_gradients: Literal["step", "substep"] = option(
        "step",
        "where G_ij = D^3 L[v_i, v_j, .] is evaluated: once per step at its start, held over its substeps like U "
        "(GD's central flow's; m(m + 1)/2 third derivatives per step), or at every substep (the reference code's)",
    )
    free_method: Literal["rk4", "euler"] = option(
        "rk4",
        "integrator of the steps with no critical direction, where the flow is the stable flow: rk4 (the "
        "stable flow's default) or euler (the reference code's, with the rates compensated for the substep)",
    )


class Critical(NamedTuple):
    directions: Array  # (d, m_max) critical eigenvectors U of P^{-1/2} H P^{-1/2}, zero past the first m
    count: Array  # type: ignore[assignment]  # () m (a NamedTuple field; shadows tuple.count)
    complete: Array  # () 1 if a tracked eigenvalue below the threshold shows U is the whole critical set
    scaled: Array  # (pairs, d) s_p G_p of V at the step's start (``pair_gradients = "step"``), else zeros
    measured: Measured  # the eigenpairs at the step's start, and (L, g) there (the free field's first)


class Oscillation(NamedTuple):
    """What the flow predicts of the oscillation, at a substep or averaged over a step's substeps."""

    excess: Array  # () 1/2 <Sigma, H> = 1/2 <X, V^T H V>: the time-averaged loss minus L(w)
    covariance: Array  # (k_max,) eigenvalues of Sigma = V X V^T, descending, zero-padded


class PreconditionedCentralFlow(OptimizerModel):
    """The row's predictions are the oscillation averaged over the step's substeps (:class:`Averaged`),
    not X at the first substep: there X also pulls back, within that one substep, the overshoot of the
    critical eigenvalues above 2/lr that built up since the last measurement (X ~ -A/dt), a spike that
    grows with the substep count (docs/adaptive.md section 4, "Which X the row reports")."""

    options: PreconditionedCentralOptions = eqx.field(static=True)

    @property
    def held(self) -> bool:
        """Whether the pair gradients G are made once per step (``pair_gradients = "step"``), not per substep."""
        return self.options.pair_gradients == "step"

    def start(self, w0: Array) -> Phase:
        return self.start_phase(w0)

    def compensated(self, n: Array | int) -> Array | float:
        """The start's compensation follows ``free_method`` (the flow starts free, as the stable flow);
        the Euler substeps of a constrained step compensate 1/n (:meth:`update`)."""
        return 1.0 / n if self.options.free_method == "euler" else 0.0

    def substeps(self, measured: Measured, setup: Critical) -> Array:
        """With a critical direction, Euler's count from :meth:`~eosflow.flows.moments.ContinuousMoments.euler_rate`
        without the rod's decay: off the critical space (h = lr lambda_P < 2; the SDCP holds h at 2 on it) the
        (w, D) rates solve s^2 + c s + c h = 0 (kappa = 1), so |s| <= max(c, h), and an Euler substep dt is
        stable for dt h < 1; 4 substeps at the edge with courant 1/2, as GD's central flow's max(4, ceil(2 lr S)).
        Else ``free_method``'s count, the stable flow's."""
        constrained = substep_count(1.0, self.moments.euler_rate(measured.sharpness), self.options)
        free_rate = self.moments.stiffness(measured.sharpness, self.options.free_method)
        return jnp.where(setup.count > 0, constrained, substep_count(1.0, free_rate, self.options))

    def term(self, setup: Critical, n: Array | int) -> tuple[Critical, Array | int]:
        return setup, n  # :meth:`update` picks the field and the solver from the step's critical count

    def update(self, term: tuple[Critical, Array | int], z: Phase, h: Any, key: Array | None) -> tuple[Phase, dict]:
        """A substep: Euler on the SDCP field with a critical direction, else the stable flow's field
        stepped by ``free_method`` (a branch taken at run time; both report the same aux)."""
        critical, n = term
        free = UPDATES[self.options.free_method]
        return jax.lax.cond(
            critical.count > 0,
            lambda z: euler(lambda y: self.field(y, critical, 1.0 / n), z, h, key),
            lambda z: free(lambda y: self.free_field(y, critical, self.compensated(n)), z, h, key),
            z,
        )

    def free_field(self, z: Phase, critical: Critical, h: Array | float) -> tuple[Phase, dict]:
        """The stable flow's field (X = 0), with the constrained field's aux: one gradient per evaluation."""
        velocity, loss, grad = self.stable_velocity(z, h, critical.measured)
        none = jnp.zeros((), jnp.int32)
        zero = jnp.zeros((), z.w.dtype)
        aux = {
            "loss": loss,
            "grad_norm": jnp.linalg.norm(grad),
            "oscillation": Averaged(Oscillation(zero, jnp.zeros((self.spectrum.k_max,), z.w.dtype))),
            "critical": critical.count,
            "cost": {
                "grads": jnp.asarray(STAGES[self.options.free_method], jnp.int32),
                "hvps": none,
                "third_derivatives": none,
            },
        }
        return velocity, aux

    def prepare(self, z: Phase, measured: Measured, step: Array) -> tuple[Phase, Critical]:
        vectors = measured.vectors
        m_max = min(vectors.shape[1], self.options.max_critical)
        m, complete = critical_count(measured.values, (1.0 - self.options.margin) * 2.0 / self.lr, m_max, z.w.size)
        directions = vectors[:, :m_max] * (jnp.arange(m_max) < m)
        if self.held:  # G of V = P^-1/2 U at the step's start, held over its substeps
            scaled = pair_gradients(
                self.objective, z.w, directions / jnp.sqrt(self.moments.preconditioner(z))[:, None], m
            )
        else:
            scaled = jnp.zeros((m_max * (m_max + 1) // 2, z.w.size), z.w.dtype)
        return z, Critical(directions, m, complete, scaled, measured)

    def oscillation(self, X: Array, v: Array, rayleigh: Array) -> Oscillation:
        root_values, root_vectors = jnp.linalg.eigh(X)
        root = (root_vectors * jnp.sqrt(jnp.maximum(root_values, 0.0))) @ root_vectors.T
        covariance = jnp.linalg.eigvalsh(root @ (v.T @ v) @ root)[::-1]  # eigenvalues of Sigma = V X V^T
        padding = jnp.zeros((self.spectrum.k_max - covariance.shape[0],), covariance.dtype)
        return Oscillation(0.5 * jnp.sum(X * rayleigh), jnp.concatenate([covariance, padding]))

    def field(self, z: Phase, critical: Critical, dt: Array | float) -> tuple[Phase, dict]:  # type: ignore[override]
        mo, lr = self.moments, self.lr
        scalar = mo.rule.second_moment == "scalar"
        (loss, grad), linear = jax.linearize(self.objective.value_and_grad, z.w)
        p, (slope, slope_mass) = mo.preconditioner(z), mo.preconditioner_slopes(z)
        mass_dot = mo.mass_velocity(z, dt)
        v = critical.directions / jnp.sqrt(p)[:, None]  # V^T P V = I on the critical columns
        m_max = v.shape[1]
        hv = column_loop(lambda i: linear(v[:, i])[1], critical.count, jnp.zeros_like(v))  # H v, m critical columns
        rayleigh = 0.5 * (v.T @ hv + hv.T @ v)  # V^T H V
        slack = 2.0 / lr * jnp.eye(m_max, dtype=z.w.dtype) - rayleigh
        # (pairs, d) s_p G_p
        gs = critical.scaled if self.held else pair_gradients(self.objective, z.w, v, critical.count)
        ws = pair_products(v)
        rate = mo.nu_rate(dt)
        nu_dot0 = rate * (mo.second(grad) - z.nu)
        p_dot0 = slope * nu_dot0 + slope_mass * mass_dot[1]  # dP/dt without the oscillation's feed
        # D relaxes to g with c = 2/(1 - h) (the lag convention's second-order term; D = g for "reference")
        direction = grad if mo.moments == "reference" else z.direction
        lam = jnp.diag(rayleigh)
        alpha_rate, beta_rate = sdcp_rates(gs, ws, direction, p, p_dot0, slope, rate, lam, lr, scalar)
        alpha = slack + dt * alpha_rate
        beta = dt * beta_rate
        X = solve_sdcp(alpha, beta, max_iters=self.options.sdcp_max_iters).X
        w_dot = -lr * (direction + 0.5 * gs.T @ svec(X)) / p
        feed = p**2 * (ws.T @ svec(lam[:, None] * X * lam[None, :]))  # diag(H Sigma H) with H v ~ P v (v^T H v)
        nu_dot = nu_dot0 + rate * (jnp.sum(feed) if scalar else feed)
        n = critical.count
        aux = {
            "loss": loss,
            "grad_norm": jnp.linalg.norm(grad),
            "oscillation": Averaged(self.oscillation(X, v, rayleigh)),
            "critical": n,
            "cost": {
                "grads": jnp.ones((), jnp.int32),
                "hvps": n,
                "third_derivatives": jnp.zeros_like(n) if self.held else n * (n + 1) // 2,
            },
        }
        d_dot = mo.velocity(z, grad, mo.second(grad), dt).direction
        return Phase(w_dot, d_dot, nu_dot, mass_dot), aux

    def observe(self, z: Phase, aux: dict, setup: Critical, n: Array | int) -> dict:
        mean = aux["oscillation"].value  # over the substeps of this row's step
        # a free step's first evaluation is at the position (:func:`~eosflow.flows.flow.position_grads`)
        counts = self.costs(aux, n, jnp.where(setup.count > 0, 0, position_grads(setup.measured) - 1))
        if self.held:  # made once, at the step's start (:meth:`prepare`)
            counts["third_derivatives"] = counts["third_derivatives"] + setup.count * (setup.count + 1) // 2
        return {
            "loss": aux["loss"],
            "predicted_loss": aux["loss"] + mean.excess,
            "grad_norm": aux["grad_norm"],
            "covariance": mean.covariance,
            "amplitude": jnp.sqrt(jnp.maximum(mean.covariance[0], 0.0)),
            "critical": aux["critical"],
            "critical_complete": setup.complete,
            **counts,
        }


def pair_products(v: Array) -> Array:
    """(pairs, d) s_p (v_i * v_j) for the columns of v (d, m), in :func:`eosflow.flows.sdcp.pair_indices` order."""
    rows, cols = pair_indices(v.shape[1])
    return jnp.asarray(pair_scale(v.shape[1]), v.dtype)[:, None] * (v[:, rows] * v[:, cols]).T


def sdcp_rates(
    gs: Array,
    ws: Array,
    direction: Array,
    p: Array | float,
    p_dot0: Array,
    slope: Array | float,
    rate: Array | float,
    lam: Array,
    lr: Array | float,
    scalar: bool,
) -> tuple[Array, Array]:
    """(alpha, beta) of the complementarity problem per unit time, without the slack A (docs/adaptive.md section 4):

    alpha = lr <G_ij, P^-1 D> + (2/lr) v_i^T diag(P_dot_0) v_j
    beta  = (lr/2) <G_ij, P^-1 G_kl> + (2/lr) rate sqrt(lam_i lam_j lam_k lam_l) sum_d P' P^2 (v_i v_j)_d (v_k v_l)_d

    from the scaled pair gradients ``gs`` (pairs, d) s_p G_p, ``ws`` (pairs, d) s_p v_i v_j, P_dot_0 the change of P
    without the oscillation's feed, ``slope`` P' = dP/dnu (d,), ``rate`` nu's (dnu/dt = rate (s(g) - nu)) and the
    critical Rayleigh quotients ``lam`` (zero rows drop out). ``scalar``: one P for all coordinates (P (1,))."""
    m = lam.shape[0]
    rows, cols = pair_indices(m)
    alpha = lr * smat(gs @ (direction / p)) + (2.0 / lr) * smat(ws @ p_dot0)
    # rows s_p sqrt(lam_i lam_j) v_i v_j: with H v ~ P v lam, the nu-part of beta as a Gram matrix (PSD)
    ws_lam = ws * jnp.sqrt(jnp.maximum(lam[rows] * lam[cols], 0.0))[:, None]
    weight = slope * p**2 * (2.0 / lr) * rate
    if scalar:
        summed = jnp.sum(ws_lam, axis=1)
        beta_p = jnp.asarray(weight)[0] * jnp.outer(summed, summed)
    else:
        beta_p = (ws_lam * weight) @ ws_lam.T
    return alpha, 0.5 * lr * (gs / p) @ gs.T + beta_p


register_models(
    "central_flow",
    PreconditionedCentralFlow,
    PreconditionedCentralOptions,
    "central flow of preconditioned GD (SDCP on P^-1/2 H P^-1/2, nu fed by the oscillation)",
    optimizers=("rmsprop",),
)
