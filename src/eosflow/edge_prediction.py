"""What the central flow predicts at a point of your own GD loop: the oscillation, and the loss it costs.

    prediction = eosflow.edge_prediction.predict(loss_fn, centre, batch, eig, lr)   # eig: the tracker's
    prediction.covariance       # X (k x k): Sigma = U X U^T, GD's oscillation about the centre
    prediction.predicted_loss   # L + 1/2 <Sigma, H>: the loss GD averages over its oscillation
    prediction.sharpening       # d lambda_i / dt along gradient flow (progressive sharpening if > 0)
    x = eosflow.edge_prediction.offsets(params, previous, eig)   # GD's measured offsets: mean(x x^T) -> X

At the edge of stability GD oscillates about a centre along the critical eigenvectors U of H (eigenvalues
>= (1 - margin) 2/lr), and the central flow (Cohen, Damian, Talwalkar, Kolter & Lee, ICLR 2025) gives that
oscillation's covariance Sigma = U X U^T from derivatives at the centre alone: X >= 0 is the least that keeps
the critical eigenvalues from rising along the flow,

    X >= 0,   alpha + beta[X] >= 0,   <X, alpha + beta[X]> = 0,
    alpha_ij = <G_ij, g>,   beta[X]_ij = 1/2 <G_ij, sum_kl X_kl G_kl>,   G_ij = grad (u_i^T H u_j) = D^3 L[u_i, u_j, .]

(the SDCP of :mod:`eosflow.flows.central` with zero slack, A = 0: its substep dt and lr scale alpha and beta
alike, so X depends on neither). With one critical direction X = sigma^2 = max(0, -2 <grad S, g> / |grad S|^2),
the oscillation of Damian, Nichani & Lee's self-stabilization (ICLR 2023). The flow's time-averaged loss is
L + 1/2 <Sigma, H> = L + 1/2 sum_i X_ii lambda_i.

The centre of GD's period-2 oscillation is, to first order in its amplitude, the midpoint of two consecutive
iterates, and the offset of w_t from it along u_i is x_i = u_i . (w_t - w_{t-1}) / 2 (:func:`offsets`), so the
central flow's claim is mean(x x^T) over steps = X. ``benchmarks/edge_prediction.py`` measures it along GD.

For every tracked pair, ``sharpening`` = -<G_ii, g> is d lambda_i / dt along gradient flow
(grad lambda_i = G_ii for a simple eigenvalue; per GD step, times lr): the rate of progressive sharpening
before the edge, and alpha's diagonal at it. The eigenpairs are H's (a tracker without a preconditioner).

RMSProp (``optimizer=optimizer_edges.rmsprop(lr)`` or ``adam(lr, b1=0)``, ``opt_state``; eigenpairs of
P^-1/2 H P^-1/2): the same problem for RMSProp's central flow (docs/adaptive.md section 4), with V = P^-1/2 U for U,
G_ij = D^3 L[v_i, v_j, .], per update

    alpha_ij = lr <G_ij, P^-1 g> + (2/lr) v_i^T diag(P_dot) v_j,     P_dot = P'(nu) rate (g^2 - nu)
    beta     = (lr/2) <G_ij, P^-1 G_kl> + (2/lr) rate sqrt(lam_i lam_j lam_k lam_l) sum_d P' P^2 (v_i v_j)_d (v_k v_l)_d

(the oscillation feeds nu by diag(H Sigma H), Sigma = V X V^T), and ``sharpening`` = -<G_ii, P^-1 g> - (lambda_i /
lr) v_i^T diag(P_dot) v_i, the preconditioned sharpness's rate along RMSProp's stable flow, P moving with nu.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from eosflow.compiled import BoundedJit
from eosflow.flows.central import pair_gradients
from eosflow.flows.flow import critical_count
from eosflow.flows.preconditioned_central import pair_products, sdcp_rates
from eosflow.flows.sdcp import pair_indices, solve_sdcp
from eosflow.objective import (
    Objective,
    check_example_count,
    check_loss_call,
    differentiable_loss,
    differentiable_part,
    layout,
    ravel,
)
from eosflow.optimizer_edges import EdgeOptimizer, SecondMoment
from eosflow.precision import MATMUL_PRECISION
from eosflow.tracing import equations
from eosflow.tracker import eigenpairs_of, flat_like_parameters

PyTree = Any


class EdgePrediction(NamedTuple):
    """The central flow's reading at a point, for k tracked eigenpairs (u_i, lambda_i) of H there."""

    loss: Array  # () L at the point
    values: Float[Array, " k"]  # lambda_i, as given
    sharpening: Float[Array, " k"]  # -<G_ii, g>: d lambda_i / dt along gradient flow (NaN where lambda_i is)
    critical: Array  # () int32: m, the top eigenvalues >= (1 - margin) 2/lr
    complete: Array  # () int32: 1 if a tracked eigenvalue below the threshold shows that m is all of them
    covariance: Float[Array, "k k"]  # X: Sigma = U X U^T (zero outside the leading m x m block)
    predicted_loss: Array  # () L + 1/2 sum_i X_ii lambda_i
    sdcp_residual: Array  # () the complementarity problem's residual (0 without a critical direction)

    @property
    def amplitude(self) -> Array:
        """sqrt of X's largest eigenvalue: the oscillation's amplitude along its main direction."""
        return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(self.covariance)[-1], 0.0))


def predict(
    loss_fn: Callable,
    params: PyTree,
    batch: PyTree,
    eig: Any,
    lr: float,
    *,
    optimizer: EdgeOptimizer | None = None,
    opt_state: Any = None,
    margin: float = 0.03,
    wrt: Any = None,
    microbatch: int | None = None,
) -> EdgePrediction:
    """:class:`EdgePrediction` of GD at step size ``lr`` at ``params`` (the centre: for GD at the edge, the midpoint
    of two consecutive iterates), from ``eig`` (anything with ``.values`` (k,) descending and ``.vectors`` (d, k),
    as :class:`eosflow.SharpnessTracker` returns) measured there.

    For RMSProp: ``optimizer=eosflow.optimizer_edges.rmsprop(lr, ...)`` (without momentum) or ``adam(lr, b1=0, ...)``
    (Adam without momentum is RMSProp with bias correction), ``opt_state`` its state at the point, and ``eig``
    measured with ``preconditioner=optimizer.preconditioner(opt_state)``; the reading is then RMSProp's central
    flow's, nu fed by the oscillation (module docstring). ``optax.sgd``'s is GD's.

    ``loss_fn(params, batch)`` (``loss_fn(params)`` with ``batch=None``), ``wrt`` and ``microbatch`` as the
    tracker's; ``margin`` as the central flow's. One gradient and k(k + 1)/2 third derivatives (jvp-of-HVP
    products, each about 3 gradients); compiled once per loss function and shapes (reuse the same ``loss_fn``),
    or traced into the caller's program when called inside ``jax.jit`` (``lr`` may then be traced too).
    """
    unravel = layout(differentiable_part(params, wrt)[0])  # shapes only: a GPU's parameters stay there
    values, vectors = eigenpairs_of(eig, "edge_prediction")
    values, vectors = check_inputs(
        jnp.asarray(values), jnp.asarray(vectors), unravel.size, lr, margin, "edge_prediction"
    )
    check_example_count(microbatch, "edge_prediction microbatch")
    dtype = vectors.dtype
    moment = second_moment(optimizer, opt_state, lr, unravel.shapes, dtype)
    arguments = (loss_fn, params, batch, values, vectors, jnp.asarray(lr, dtype), jnp.asarray(margin, dtype), moment)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(arguments[1:])):
        return _prediction(*arguments, wrt, microbatch)  # inside the user's jit: part of their program
    return _compiled(*arguments, wrt, microbatch)


def second_moment(
    optimizer: EdgeOptimizer | None, opt_state: Any, lr: Any, shapes: tuple, dtype: Any
) -> SecondMoment | None:
    """RMSProp's :class:`~eosflow.optimizer_edges.SecondMoment` at ``opt_state``, flat in the measured parameters'
    order (their leaves' ``shapes``); None for GD (no optimizer, or optax.sgd without momentum). Another optimizer,
    a missing state, or a constant lr other than ``lr`` is a ValueError that names it."""
    where = "edge_prediction"
    if optimizer is None:
        if opt_state is not None:
            raise ValueError(f"{where}: opt_state given without its optimizer (optimizer=optimizer_edges.rmsprop(...))")
        return None
    if not isinstance(optimizer, EdgeOptimizer):
        raise ValueError(
            f"{where}: optimizer must be an eosflow.optimizer_edges optimizer (e.g. optimizer_edges.rmsprop(lr)), "
            f"got {type(optimizer).__name__}"
        )
    steps_with = optimizer.lr
    if not callable(steps_with) and not isinstance(lr, jax.core.Tracer) and not np.isclose(steps_with, lr, rtol=1e-6):
        raise ValueError(f"{where}: lr = {lr!r}, but the optimizer steps with lr = {optimizer.lr!r}")
    plain_gd = optimizer.preconditioner is None and np.isclose(float(optimizer.edge(1.0)), 2.0)
    if plain_gd:
        return None
    if optimizer.second_moment is None:
        raise ValueError(
            f"{where}: the central flow at a point is derived for GD and for RMSProp without momentum "
            "(preconditioned GD; Adam at b1 = 0 is RMSProp with bias correction); this optimizer has momentum, "
            "weight decay or AMSGrad's running max, and no published central flow"
        )
    if opt_state is None:
        raise ValueError(f"{where}: RMSProp's reading (Adam's at b1 = 0) needs its nu at the point: pass opt_state=")
    moment = optimizer.second_moment(opt_state)
    nu, p, slope = (
        flat_like_parameters(tree, shapes, dtype, f"{where}: the optimizer's {name}")
        for tree, name in ((moment.nu, "nu"), (moment.preconditioner, "P"), (moment.slope, "dP/dnu"))
    )
    return SecondMoment(nu, p, slope, jnp.asarray(moment.rate, dtype))


def check_inputs(values: Any, vectors: Any, size: int, lr: Any, margin: Any, where: str) -> tuple[Any, Any]:
    """(values, vectors) if they are k eigenpairs of a Hessian of ``size`` parameters and lr, margin are valid;
    else a ValueError that says which, naming ``where``. Shapes only, and lr and margin where they are known:
    traced under ``jax.jit`` (a prediction inside the user's jitted step), they are not checked."""
    if values.ndim != 1 or vectors.ndim != 2 or vectors.shape[1] != values.shape[0]:
        raise ValueError(
            f"{where}: eig.values must be (k,) and eig.vectors (d, k), got {values.shape} and {vectors.shape}"
        )
    if vectors.shape[0] != size:
        raise ValueError(
            f"{where}: eig.vectors has {vectors.shape[0]} rows, the measured parameters {size} entries: "
            "pass the eigenpairs measured on these parameters (with the same wrt)"
        )
    if not isinstance(margin, jax.core.Tracer) and not 0 <= margin < 1:
        raise ValueError(f"{where}: margin must be in [0, 1), got {margin!r}")
    if not isinstance(lr, jax.core.Tracer) and not lr > 0:
        raise ValueError(f"{where}: lr must be positive, got {lr!r}")
    return values, vectors


def _prediction(
    loss_fn: Callable,
    params: PyTree,
    batch: PyTree,
    values: Float[Array, " k"],
    vectors: Float[Array, "d k"],
    lr: Array,
    margin: Array,
    moment: SecondMoment | None,
    wrt: Any,
    microbatch: int | None,
) -> EdgePrediction:
    arrays, rebuild = differentiable_part(params, wrt)
    flat, unravel = ravel(arrays)
    call = check_loss_call(loss_fn, batch, "edge_prediction.predict")

    def loss_on(w: Array, data: PyTree) -> Array:
        model = rebuild(unravel(w))
        return loss_fn(model) if data is None else loss_fn(model, data)

    differentiable = differentiable_loss(loss_on, equations(loss_on, flat, batch), f"edge_prediction: {call}")
    objective = Objective(loss_on=differentiable, data=batch, unravel=lambda w: w, microbatch=microbatch)
    directions = vectors.astype(flat.dtype)  # V = U, or P^-1/2 U for RMSProp (V^T P V = I)
    if moment is not None:
        directions = directions / jnp.sqrt(moment.preconditioner)[:, None]
    with jax.default_matmul_precision(MATMUL_PRECISION):
        loss, grad = objective.value_and_grad(flat)
        scaled = pair_gradients(objective, flat, directions)
    return reading(loss, grad, scaled, values.astype(flat.dtype), directions, lr, margin, moment)


def reading(
    loss: Array,
    grad: Float[Array, " d"],
    scaled: Float[Array, "p d"],
    values: Float[Array, " k"],
    directions: Float[Array, "d k"],
    lr,
    margin,
    moment: SecondMoment | None = None,
) -> EdgePrediction:
    """:class:`EdgePrediction` from L, g, the scaled pair gradients s_p G_p of the k tracked directions V at a point
    (p = k(k+1)/2 in :func:`eosflow.flows.sdcp.pair_indices` order, s_p = sqrt 2 off the diagonal, as
    :func:`eosflow.flows.central.pair_gradients` gives them) and V itself (U for GD, P^-1/2 U for RMSProp, with
    ``moment`` its flat :class:`~eosflow.optimizer_edges.SecondMoment`), whatever computed them (JAX or torch)."""
    k = values.shape[0]
    rows, cols = pair_indices(k)
    diagonal = np.flatnonzero(rows == cols)  # the pairs (i, i), i = 0 .. k - 1 in order
    p, nu, slope, rate = (
        (1.0, 0.0, 0.0, 0.0) if moment is None else (moment.preconditioner, moment.nu, moment.slope, moment.rate)
    )
    p_dot = slope * rate * (grad**2 - nu)  # P's change per step with no oscillation (0 for GD)
    squares = directions**2
    sharpening = -(scaled[diagonal] @ (grad / p)) - values / lr * (squares.T @ p_dot)
    sharpening = jnp.where(jnp.isnan(values), jnp.nan, sharpening)
    m, complete = critical_count(values, (1.0 - margin) * 2.0 / lr, k, grad.size)
    active = jnp.arange(k) < m
    pairs = (active[rows] & active[cols])[:, None]  # no coupling to a direction that is not critical
    lam = jnp.where(active, values, 0.0)
    alpha, beta = sdcp_rates(
        scaled * pairs, pair_products(directions) * pairs, grad, p, p_dot, slope, rate, lam, lr, scalar=False
    )
    free = 1.0 + jnp.linalg.norm(alpha)  # any positive slack keeps X_ii = 0 off the critical set
    alpha = alpha + jnp.diag(jnp.where(active, 0.0, free))
    solution = solve_sdcp(alpha, beta)
    X = solution.X * (active[:, None] & active[None, :])
    return EdgePrediction(
        loss=loss,
        values=values,
        sharpening=sharpening,
        critical=m,
        complete=complete,
        covariance=X,
        predicted_loss=loss + 0.5 * jnp.sum(jnp.diag(X) * lam),
        sdcp_residual=jnp.where(m > 0, solution.residual, 0.0),
    )


_compiled = BoundedJit(_prediction, kept=8)  # per loss function, shapes and wrt (eosflow.compiled)


def offsets(
    params: PyTree, previous: PyTree, eig: Any, wrt: Any = None, preconditioner: PyTree = None
) -> Float[Array, " k"]:
    """x_i = u_i . (w_t - w_{t-1}) / 2: GD's offset from the midpoint of its last two iterates along each tracked
    eigenvector (``params`` = w_t, ``previous`` = w_{t-1}; flattened as the tracker flattens them). With RMSProp's
    ``preconditioner`` P (as given to the tracker), x_i = u_i . P^{1/2} (w_t - w_{t-1}) / 2, in X's coordinates."""
    now, unravel = ravel(differentiable_part(params, wrt)[0], on_device=True)
    before = ravel(differentiable_part(previous, wrt)[0], "previous", on_device=True)[0]
    if now.shape != before.shape:
        raise ValueError(f"edge_prediction.offsets: params has {now.size} entries, previous {before.size}")
    p = None
    if preconditioner is not None:
        where = "edge_prediction.offsets: the preconditioner"
        p = flat_like_parameters(preconditioner, unravel.shapes, now.dtype, where)
    vectors = jnp.asarray(eigenpairs_of(eig, "edge_prediction.offsets", now.size)[1])
    return _half_steps(vectors, now, before, p)


@jax.jit
def _half_steps(vectors: Float[Array, "d k"], now: Float[Array, " d"], before: Float[Array, " d"], p) -> Array:
    """U^T P^{1/2} (now - before) / 2 (P = I for None), compiled: its constants never cross from the host."""
    step = now - before
    return vectors.T @ (step if p is None else jnp.sqrt(p) * step) / 2.0
