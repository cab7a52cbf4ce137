"""Adaptive large step sizes at the edge of stability: non-monotone line searches (Flatland).

Gradient descent w_{k+1} = w_k - eta_k g_k whose step eta_k is searched at every step for the
sufficient-decrease test against a reference value R_k >= L(w_k):

    L(w_k - eta g_k) <= R_k - c eta ||g_k||^2                                     (test)

- ``reference = "zhang_hager"`` (NLS): R_k = max(C_k, L(w_k)) with the running average
  Q_{k+1} = xi Q_k + 1, C_{k+1} = (xi Q_k C_k + L(w_{k+1})) / Q_{k+1}, Q_0 = 1, C_0 = L(w_0);
  ``"max"`` (Grippo): R_k = the largest of the last M losses; ``"monotone"``: R_k = L(w_k)
  (monotone Armijo, the "LS" baseline).
- The search (:func:`line_search`) starts from a trial step (the previous eta, or the Polyak
  step L(w_k) / (c_p ||g_k||^2)), multiplies it by delta while the test fails and by 1/delta
  while it holds, inside one ``lax.while_loop`` with at most ``max_evals`` loss evaluations.
  If the test fails at eta/delta then, with the segment smoothness
  l(w, eta) = sup_{0 < e <= eta} ||g(w) - g(w - e g)|| / (e ||g||),  eta >= 2 delta (1 - c) / l(w, eta/delta)
  (derivation in docs/flatland.md).
- The cap (``cap = true``) keeps eta <= cap_fraction * 2 / S_flat, where S_flat is the smallest
  sharpness a squared loss allows (its last-layer bias block; 1 for eosflow's ``mse``, i.e.
  eta < K for the mean-over-entries MSE of the paper), so that GD at the edge of stability
  (S ~ 2/eta) cannot settle on a globally flat point.

Registered as ``nls`` (Zhang-Hager, warm start), ``ponls`` (Zhang-Hager, Polyak start) and
``armijo`` (monotone, warm start); all share :class:`LineSearchOptions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.config import SpecError, option, warn_unused
from eosflow.objective import Objective, mse, sse
from eosflow.process import ScannedProcess, register_process, scanned_fields
from eosflow.spectrum import carried, top_hessian_eigenpairs, tracked_row, value_grad_and_tracked

Reference = Literal["zhang_hager", "max", "monotone"]
Initial = Literal["warm", "polyak"]

_REFERENCE_HELP = (
    "R_k of the test L(w - eta g) <= R_k - c eta |g|^2: zhang_hager: max(C_k, L(w_k)), C_k the "
    "xi-weighted average of past losses; max: the largest of the last `memory` losses; monotone: L(w_k) (Armijo)"
)
_INITIAL_HELP = (
    "first trial step: warm: the previous eta (the spec's lr at step 0); "
    "polyak: L(w_k) / (c_p |g_k|^2), or the warm one where that is not positive"
)


@dataclasses.dataclass(frozen=True)
class LineSearchOptions:
    reference: Reference = option("zhang_hager", _REFERENCE_HELP)
    xi: float = option(
        0.99, "Zhang-Hager weight xi of the past in C_k (0: monotone; Zhang and Hager used 0.85)", ge=0, le=1
    )
    memory: int = option(10, "M, past losses in the `max` (Grippo) reference", ge=1)
    initial: Initial = option("warm", _INITIAL_HELP)
    polyak_scale: float = option(0.5, "c_p of the Polyak trial step L / (c_p |g|^2)", gt=0)
    c: float = option(1e-4, "sufficient-decrease constant c of the test", gt=0, lt=1)
    delta: float = option(0.5, "backtracking factor (a failed trial is multiplied by delta)", gt=0, lt=1)
    extrapolate: bool = option(True, "multiply an accepted trial by 1/delta while the test still holds")
    max_evals: int = option(30, "loss evaluations of the grid search per step at most", ge=1)
    refine: int = option(
        2,
        "extra loss evaluations bisecting the last bracket (accepted, first rejected) towards "
        "the equality point of the test (0: the grid's step)",
        ge=0,
    )
    cap: bool = option(False, "keep eta <= cap_fraction * 2 / S_flat (S_flat: the last-layer bias block's curvature)")
    cap_fraction: float = option(
        0.5, "the cap as a fraction of 2 / S_flat (1: eta < K in the paper's mean-over-entries MSE)", gt=0, le=1
    )
    max_lr: float = option(0.0, "an absolute bound on eta (0: none)", ge=0)
    accuracy_every: int = option(10, "test (and train) accuracy every n steps (0: never)", ge=0)


@dataclasses.dataclass(frozen=True)
class PoNLSOptions(LineSearchOptions):
    initial: Initial = option("polyak", _INITIAL_HELP)


@dataclasses.dataclass(frozen=True)
class ArmijoOptions(LineSearchOptions):
    reference: Reference = option("monotone", _REFERENCE_HELP)


# ---- the search --------------------------------------------------------------------------------


class SearchResult(NamedTuple):
    lr: Array  # the step eta taken
    loss: Array  # L(w - eta g)
    evals: Array  # loss evaluations spent
    accepted: Array  # the test holds at eta (False only when the budget ran out backtracking)


_FIRST, _BACKTRACK, _EXTRAPOLATE, _REFINE, _DONE = 0, 1, 2, 3, 4


def line_search(
    value: Callable[[Array], Array],
    w: Array,
    loss: Array,
    grad: Array,
    reference: Array,
    trial: Array,
    *,
    c: float,
    delta: float,
    max_evals: int,
    max_lr: float = float("inf"),
    extrapolate: bool = True,
    refine: int = 0,
) -> SearchResult:
    """The largest step on the grid trial * delta^{+-j} (up to ``max_lr``) passing the test, then
    refined towards the step where the test holds with equality.

    Test: value(w - eta g) <= reference - c eta ||g||^2 (``loss`` = value(w)). A failed first
    trial is multiplied by delta until the test holds; a passed one by 1/delta while it holds
    (``extrapolate``), stopping at the first failure, at ``max_lr`` or when ``max_evals`` loss
    evaluations are spent. When the grid ends with a bracket (the accepted step lo and the failed
    trial hi = lo / delta above it), ``refine`` more evaluations bisect it geometrically: the test at
    sqrt(lo hi) moves lo up (pass) or hi down (fail), so the accepted step ends within a factor
    (1/delta)^(2^-refine) of a failed one (1.09 for refine = 3, delta = 1/2).
    If backtracking runs out of budget the last (smallest) trial is taken, marked not accepted.
    A zero gradient takes the trial step without a search (every step passes).
    """
    grad_sq = jnp.vdot(grad, grad)
    trial = jnp.minimum(jnp.asarray(trial, w.dtype), max_lr)

    def passes(lr, new_loss):
        return new_loss <= reference - c * lr * grad_sq  # False for a NaN loss

    def searching(carry):
        phase, *_, evals, _ = carry
        return (phase != _DONE) & ((evals < max_evals) | (phase == _REFINE))

    def evaluate(carry):
        phase, lr, best_lr, best_loss, high, _, _, evals, refined = carry
        trial_loss = value(w - lr * grad)
        ok = passes(lr, trial_loss)
        grown = jnp.minimum(lr / delta, max_lr)
        can_grow = extrapolate & (grown > lr)
        best_lr, best_loss = jnp.where(ok, lr, best_lr), jnp.where(ok, trial_loss, best_loss)
        high = jnp.where(ok, high, jnp.minimum(high, lr))  # the smallest failed trial
        refined = refined + (phase == _REFINE)
        # first trial: pass -> extrapolate, fail -> backtrack; backtrack: pass -> bracketed;
        # extrapolate: fail -> bracketed (keeping the last pass); a bracket is refined `refine` times
        bracketed = jnp.where(ok, phase == _BACKTRACK, phase == _EXTRAPOLATE)
        grid_phase = jnp.where(
            bracketed,
            jnp.where(refine > 0, _REFINE, _DONE),
            jnp.where(ok, jnp.where(can_grow, _EXTRAPOLATE, _DONE), _BACKTRACK),
        )
        next_phase = jnp.where(phase == _REFINE, jnp.where(refined < refine, _REFINE, _DONE), grid_phase)
        bisection = jnp.sqrt(best_lr * high)
        next_lr = jnp.where(next_phase == _REFINE, bisection, jnp.where(ok, grown, lr * delta))
        return (next_phase.astype(phase.dtype), next_lr, best_lr, best_loss, high, lr, trial_loss, evals + 1, refined)

    nan = jnp.full((), jnp.nan, w.dtype)
    zero_grad = grad_sq == 0
    phase = jnp.where(zero_grad, _DONE, _FIRST).astype(jnp.int32)
    start = (
        phase,
        trial,
        nan,
        nan,
        jnp.full((), jnp.inf, w.dtype),
        trial,
        loss,
        jnp.asarray(0, jnp.int32),
        jnp.asarray(0, jnp.int32),
    )
    _, _, best_lr, best_loss, _, last_lr, last_loss, evals, _ = jax.lax.while_loop(searching, evaluate, start)
    accepted = jnp.isfinite(best_lr)
    step = jnp.where(accepted, best_lr, last_lr)  # last_lr: the smallest trial, or the zero-gradient trial
    new_loss = jnp.where(accepted, best_loss, last_loss)
    return SearchResult(step, new_loss, evals, accepted | zero_grad)


def polyak_step(loss: Array, grad_sq: Array, scale: float) -> Array:
    """eta = L(w) / (c_p ||g||^2): the Polyak step with optimal value 0."""
    return loss / (scale * jnp.maximum(grad_sq, jnp.finfo(grad_sq.dtype).tiny))


def polyak_trial(loss: Array, grad_sq: Array, scale: float, warm: Array) -> Array:
    """The Polyak step where it is a positive finite number, else the warm start ``warm`` (ours): a loss at or
    below 0, the optimal value the Polyak step assumes, gave eta <= 0 (gradient ascent, accepted by the test's
    non-monotone reference), and a stationary point with L > 0 gave eta = inf (w - inf * 0 = NaN)."""
    eta = polyak_step(loss, grad_sq, scale)
    return jnp.where((eta > 0) & jnp.isfinite(eta), eta, warm)


# ---- the non-monotone reference R_k ---------------------------------------------------------------


class ReferenceState(NamedTuple):
    average: Array  # C_k, the Zhang-Hager average of past losses
    weight: Array  # Q_k
    recent: Array  # the last M losses (the Grippo reference), newest first


def initial_reference(loss: Array, memory: int) -> ReferenceState:
    """Q_0 = 1, C_0 = L(w_0), and the memory filled with L(w_0)."""
    return ReferenceState(loss, jnp.ones_like(loss), jnp.full((memory,), loss))


def reference_value(kind: Reference, history: ReferenceState, loss: Array) -> Array:
    """R_k given L(w_k): max(C_k, L(w_k)), max of the last M losses, or L(w_k)."""
    if kind == "zhang_hager":
        return jnp.maximum(history.average, loss)
    if kind == "max":
        return jnp.maximum(jnp.max(history.recent), loss)
    return loss


def update_reference(history: ReferenceState, new_loss: Array, xi: float) -> ReferenceState:
    """Q_{k+1} = xi Q_k + 1, C_{k+1} = (xi Q_k C_k + L(w_{k+1})) / Q_{k+1}; push L(w_{k+1}) into the memory."""
    weight = xi * history.weight + 1
    average = (xi * history.weight * history.average + new_loss) / weight
    recent = jnp.concatenate([new_loss[None], history.recent[:-1]])
    return ReferenceState(average, weight, recent)


# ---- the cap -------------------------------------------------------------------------------------


def flat_sharpness(objective: Objective) -> float | None:
    """S_flat: lambda_max of d^2 L / db^2 for one shift b of every example's outputs (None if not a squared loss).

    This is the Hessian block of a last-layer bias, a principal block of H(w) at every w, so
    S(w) >= S_flat everywhere (for a network with a last-layer bias). For eosflow's ``mse``
    (1/2 |f - y|^2) it is 1; for ``sse`` 2; for the mean-over-entries MSE it would be 2/K.
    """
    loss = getattr(objective.loss_on, "loss", None)
    if objective.data is None or loss not in (mse, sse):
        return None
    targets = objective.data[1]
    shift = jnp.zeros(targets.shape[1:], targets.dtype)
    block = jax.hessian(lambda b: loss(targets + b, targets))(shift).reshape(shift.size, shift.size)
    return float(jnp.linalg.eigvalsh(block)[-1])


def step_bound(options: LineSearchOptions, objective: Objective, where: str, w0: Array) -> float:
    """The largest eta allowed: min(max_lr, cap_fraction * 2 / S_flat) over the bounds that are on.

    S_flat is a floor of S(w) only for a model with a last-layer bias (docs/flatland.md): a sharpness below it
    at w0 (ARPACK, or the dense Hessian for small d) shows a model without one, where the cap means nothing."""
    bound = options.max_lr if options.max_lr > 0 else float("inf")
    if options.cap:
        floor = flat_sharpness(objective)
        if floor is None:
            raise SpecError(
                f"`{where}.cap` = true needs a squared loss over the outputs (problem.loss = 'mse'), whose "
                f"sharpness has the floor S_flat; for other losses bound the step with `{where}.max_lr` instead"
            )
        sharpness = float(top_hessian_eigenpairs(DENSE_UP_TO, objective, w0, 1)[0][0])
        if sharpness < floor * (1 - 1e-6):
            raise SpecError(
                f"`{where}.cap` = true bounds eta by 2 / S_flat, S_flat = {floor:g} being the sharpness floor of a "
                f"model with a last-layer bias; this model's sharpness is {sharpness:.6g} at w0, below it, so it has "
                f"no such floor: bound the step with `{where}.max_lr` instead"
            )
        bound = min(bound, options.cap_fraction * 2.0 / floor)
    return bound


DENSE_UP_TO = 200  # the cap's check of S(w0) >= S_flat: the dense Hessian up to this many parameters


# ---- the process ---------------------------------------------------------------------------------


class LineSearchState(NamedTuple):
    w: Array
    lr: Array  # eta_{k-1} (the warm start); the spec's lr before the first step
    history: ReferenceState
    vectors: Array
    step: Array


class LineSearchGD(ScannedProcess):
    """Gradient descent with a step size searched at every step (see the module docstring)."""

    objective: Objective
    options: LineSearchOptions = eqx.field(static=True)
    max_lr: float = eqx.field(static=True)
    accuracy: Callable[[Array, Any], Array] | None = eqx.field(static=True)
    test_data: Any  # the held-out batch, or None

    def init(self, w0: Array) -> LineSearchState:
        history = initial_reference(self.objective.value(w0), self.options.memory)
        lr = jnp.minimum(jnp.asarray(self.lr, w0.dtype), self.max_lr)
        return LineSearchState(w0, lr, history, self.initial_vectors(w0), jnp.asarray(0))

    def step(self, state: LineSearchState) -> tuple[LineSearchState, dict[str, Array]]:
        o, w = self.options, state.w
        (loss, grad), pairs = value_grad_and_tracked(self.objective, w, state.vectors, state.step, self.spectrum)
        grad_sq = jnp.vdot(grad, grad)
        reference = reference_value(o.reference, state.history, loss)
        trial = state.lr if o.initial == "warm" else polyak_trial(loss, grad_sq, o.polyak_scale, state.lr)
        found = line_search(
            self.objective.value,
            w,
            loss,
            grad,
            reference,
            trial,
            c=o.c,
            delta=o.delta,
            max_evals=o.max_evals,
            max_lr=self.max_lr,
            extrapolate=o.extrapolate,
            refine=o.refine,
        )
        vectors, row = carried(pairs, self.spectrum.carry, state.vectors), tracked_row(pairs, found.lr, self.spectrum)
        row.update(
            position=w,
            loss=loss,
            grad_norm=jnp.sqrt(grad_sq),
            lr=found.lr,
            loss_evals=found.evals,
            accepted=found.accepted,
            reference_loss=reference,
            grads=jnp.asarray(1),
            **self.accuracy_row(w, state.step),
        )
        history = update_reference(state.history, found.loss, o.xi)
        return LineSearchState(w - found.lr * grad, found.lr, history, vectors, state.step + 1), row

    def divergence_hint(self, rows: dict[str, np.ndarray]) -> str:
        """A search that ran out of its ``max_evals`` backtracking took its smallest trial, which the test had
        refused (``accepted`` = 0): a divergence after that is the budget's, not the rule's."""
        accepted = np.asarray(rows.get("accepted", []), dtype=bool)
        if not accepted.size or accepted.all():
            return ""
        return (
            f"its line search ran out of its {self.options.max_evals} loss evaluations at {int((~accepted).sum())} of "
            f"{accepted.size} steps (accepted = 0) and took a step its test had refused: raise max_evals or lower lr "
            "(the first trial)"
        )

    def accuracy_row(self, w: Array, step: Array) -> dict[str, Array]:
        """``test_accuracy`` and ``train_accuracy`` every ``accuracy_every`` steps (NaN otherwise)."""
        every = self.options.accuracy_every
        if self.accuracy is None or every == 0:
            return {}

        def measure(_):
            test = jnp.nan if self.test_data is None else self.accuracy(w, self.test_data)
            return jnp.asarray(test, w.dtype), self.accuracy(w, self.objective.data).astype(w.dtype)

        def skip(_):
            nan = jnp.full((), jnp.nan, w.dtype)
            return nan, nan

        test, train = jax.lax.cond(step % every == 0, measure, skip, None)
        return {"test_accuracy": test, "train_accuracy": train}


def build_line_search(name: str):
    def build(problem, spec, options: LineSearchOptions) -> LineSearchGD:
        unused = {
            "polyak_scale": ("it scales the Polyak trial", options.initial == "warm", "initial = 'warm'"),
            "cap_fraction": ("it scales the cap", not options.cap, "cap = false"),
            "memory": (
                "it is the memory of reference = 'max'",
                options.reference != "max",
                f"reference = {options.reference!r}",
            ),
        }
        warn_unused(options, name, {key: f"{what}, and {why}" for key, (what, off, why) in unused.items() if off})
        test = problem.test_objective
        return LineSearchGD(
            **scanned_fields(name, spec, problem.objective),
            options=options,
            max_lr=step_bound(options, problem.objective, name, problem.w0),
            accuracy=problem.accuracy,
            test_data=None if test is None else test.data,
        )

    return build


register_process(
    "nls",
    LineSearchOptions,
    "GD with a non-monotone (Zhang-Hager) line search, backtracking and extrapolation",
    discrete=True,
)(build_line_search("nls"))
register_process(
    "ponls", PoNLSOptions, "non-monotone line search started from the Polyak step L / (c_p |g|^2)", discrete=True
)(build_line_search("ponls"))
register_process(
    "armijo", ArmijoOptions, "GD with a monotone Armijo line search (backtracking and extrapolation)", discrete=True
)(build_line_search("armijo"))
