"""Momentum and adaptive optimizers as update rules: heavy ball, Nesterov, RMSProp, Adam.

Every optimizer here is preconditioned GD with a momentum (docs/adaptive.md):

    nu_{k+1} = b2 nu_k + (1 - b2) s(g_k)          s(g) = g^2 (diagonal) or ||g||^2 (scalar)
    m_{k+1}  = b1 m_k + a g_k                      a = 1 - b1 (EMA form) or 1 (classical, Nesterov)
    P_{k+1}  = sqrt(nu_{k+1} / c2 + eps_root) + eps          (P = 1 without a second moment)
    w_{k+1}  = w_k - lr D_{k+1} / P_{k+1}          D = m / c1 (EMA), m (classical), g_k + b1 m (Nesterov)

with the bias corrections c1 = 1 - b1^{k+1}, c2 = 1 - b2^{k+1} when ``bias_correction`` is on (1
otherwise). :class:`UpdateRule` is that map in Optax's shape (``init``, ``update`` on a
NamedTuple state); :class:`AdaptiveOptimizer` runs it as a process that records the
*preconditioned* top eigenpairs (those of P^{-1/2} H P^{-1/2}, P the preconditioner of the step
being taken, warm-started LOBPCG with the ``[spectrum]`` tolerance contract) and the edge ratio
preconditioned sharpness / threshold, 1 at the optimizer's edge of stability
(:func:`eosflow.preconditioning.edge_threshold`).

Registered: ``momentum`` (heavy ball, ``form`` = "classical" or "ema"), ``nesterov``, ``rmsprop``
(``second_moment`` = "diagonal" or "scalar") and ``adam``. Each one's table (``[adam]``, ...)
holds the hyperparameters, which its models (``adam_stable_flow``, ...) read too.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import option
from eosflow.objective import Objective
from eosflow.preconditioning import MomentumForm, diagonal_preconditioner, edge_threshold
from eosflow.process import ScannedProcess, register_process, scanned_fields
from eosflow.spectrum import Eigenpairs, carried, measured_row, value_grad_and_tracked
from eosflow.tracker import WarmStart, gd_warm_start, start_history

Form = Literal["none", "classical", "ema", "nesterov"]
SecondMoment = Literal["none", "diagonal", "scalar"]


class RuleState(NamedTuple):
    m: Array  # (d,) first moment: the EMA of g (form "ema") or the buffer sum b1^j g (classical, Nesterov)
    nu: Array  # (d,) second moment, () for the scalar form and without one
    count: Array  # type: ignore[assignment]  # () steps taken (a NamedTuple field; shadows tuple.count)


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """One step of preconditioned GD with momentum (module docstring), Optax-style."""

    form: Form = "none"
    beta1: float = 0.0
    second_moment: SecondMoment = "none"
    beta2: float = 0.0
    eps: float = 0.0
    eps_root: float = 0.0
    bias_correction: bool = False

    def init(self, w: Array) -> RuleState:
        nu = jnp.zeros_like(w) if self.second_moment == "diagonal" else jnp.zeros((), w.dtype)
        return RuleState(jnp.zeros_like(w), nu, jnp.asarray(0, jnp.int32))

    def moments(self, state: RuleState, grad: Array) -> RuleState:
        """(m_{k+1}, nu_{k+1}, k + 1) from (m_k, nu_k, k) and g_k."""
        b1, b2 = self.beta1, self.beta2
        m = b1 * state.m + ((1.0 - b1) if self.form == "ema" else 1.0) * grad
        if self.form == "none":
            m = grad
        if self.second_moment == "none":
            nu = state.nu
        else:
            square = grad**2 if self.second_moment == "diagonal" else jnp.sum(grad**2)
            nu = b2 * state.nu + (1.0 - b2) * square
        return RuleState(m, nu, state.count + 1)

    def preconditioner(self, state: RuleState, like: Array) -> Array:
        """P (d,) of the step that produced ``state`` (count = k + 1); ones without a second moment."""
        if self.second_moment == "none":
            return jnp.ones_like(like)
        correction = 1.0 - self.beta2 ** state.count.astype(like.dtype) if self.bias_correction else 1.0
        p = diagonal_preconditioner(state.nu, self.eps, self.eps_root, correction)
        return jnp.broadcast_to(p, like.shape)

    def direction(self, state: RuleState, grad: Array) -> Array:
        """D_{k+1}: what lr P^{-1} multiplies (``state`` after :meth:`moments`, ``grad`` = g_k)."""
        if self.form == "nesterov":
            return grad + self.beta1 * state.m
        if self.form == "ema" and self.bias_correction:
            return state.m / (1.0 - self.beta1 ** state.count.astype(grad.dtype))
        return state.m

    def update(self, grad: Array, state: RuleState, lr: float) -> tuple[Array, RuleState]:
        """(the step w_{k+1} - w_k, the new state), as ``optax.GradientTransformation.update``."""
        state = self.moments(state, grad)
        return -lr * self.direction(state, grad) / self.preconditioner(state, grad), state

    @property
    def momentum_form(self) -> MomentumForm:
        return "classical" if self.form == "none" else self.form

    def threshold(self, lr: float) -> float:
        """The preconditioned sharpness at this optimizer's edge of stability."""
        return edge_threshold(lr, self.beta1 if self.form != "none" else 0.0, self.momentum_form)


# ---- the hyperparameters of each optimizer (the spec's [momentum], [nesterov], [rmsprop], [adam]) ----


@dataclasses.dataclass(frozen=True)
class TrackedOptimizerOptions:
    """What every optimizer's table holds besides its hyperparameters: where its eigensolver starts."""

    warm_start: WarmStart = option(
        "fitted",
        "the optimizer's eigensolver start, as gd.warm_start: fitted (same-side vectors moved on by their "
        "last change, damped), extrapolated, same_side (step t-2's when w_(t-2) is nearer w_t than w_(t-1) is, "
        "else t-1's) or previous (step t-1's); its models measure at their centre, from their previous step",
    )


@dataclasses.dataclass(frozen=True)
class MomentumOptions(TrackedOptimizerOptions):
    beta: float = option(0.9, "momentum beta", ge=0, lt=1)
    form: Literal["classical", "ema"] = option(
        "classical",
        "classical: v <- beta v + g, w <- w - lr v (threshold 2(1+beta)/lr); "
        "ema: m <- beta m + (1-beta) g, w <- w - lr m (threshold 2(1+beta)/((1-beta) lr))",
    )

    def rule(self) -> UpdateRule:
        return UpdateRule(form=self.form, beta1=self.beta)


@dataclasses.dataclass(frozen=True)
class NesterovOptions(TrackedOptimizerOptions):
    beta: float = option(
        0.9,
        "momentum beta: v <- beta v + g, w <- w - lr (g + beta v) (threshold 2(1+beta)/((1+2 beta) lr))",
        ge=0,
        lt=1,
    )

    def rule(self) -> UpdateRule:
        return UpdateRule(form="nesterov", beta1=self.beta)


@dataclasses.dataclass(frozen=True)
class RMSPropOptions(TrackedOptimizerOptions):
    beta2: float = option(0.99, "decay b2 of nu <- b2 nu + (1 - b2) s(g)", ge=0, lt=1)
    second_moment: Literal["diagonal", "scalar"] = option(
        "diagonal", "diagonal: s(g) = g^2 per coordinate; scalar: s(g) = ||g||^2 (one step size)"
    )
    eps: float = option(
        1e-8,
        "eps added to sqrt(nu) in P = sqrt(nu + eps_root) + eps (0 divides by zero "
        "on a coordinate whose gradient is always 0)",
        ge=0,
    )
    eps_root: float = option(0.0, "eps_root inside the square root (optax's eps_in_sqrt)", ge=0)
    bias_correction: bool = option(False, "divide nu by 1 - b2^t")

    def rule(self) -> UpdateRule:
        return UpdateRule(
            second_moment=self.second_moment,
            beta2=self.beta2,
            eps=self.eps,
            eps_root=self.eps_root,
            bias_correction=self.bias_correction,
        )


@dataclasses.dataclass(frozen=True)
class AdamOptions(TrackedOptimizerOptions):
    beta1: float = option(0.9, "decay b1 of the first moment m <- b1 m + (1 - b1) g", ge=0, lt=1)
    beta2: float = option(0.999, "decay b2 of the second moment nu <- b2 nu + (1 - b2) g^2", ge=0, lt=1)
    eps: float = option(
        1e-8, "eps added to sqrt(nu_hat) (0 divides by zero on a coordinate whose gradient is always 0)", ge=0
    )
    eps_root: float = option(0.0, "eps_root inside the square root", ge=0)
    bias_correction: bool = option(True, "divide m by 1 - b1^t and nu by 1 - b2^t")

    def rule(self) -> UpdateRule:
        return UpdateRule(
            form="ema",
            beta1=self.beta1,
            second_moment="diagonal",
            beta2=self.beta2,
            eps=self.eps,
            eps_root=self.eps_root,
            bias_correction=self.bias_correction,
        )


# ---- the process ---------------------------------------------------------------------------------


class OptimizerState(NamedTuple):
    w: Array  # (d,) the iterate w_k
    previous: Array  # (d,) w_{k-1} (for ``oscillation``)
    before: Array  # (d,) w_{k-2} (the warm start's: is w_k nearer it than w_{k-1}, on the same side of a bounce?)
    rule: RuleState
    vectors: Array  # (d, k) tracked eigenvectors of P^{-1/2} H P^{-1/2} measured at step k - 1 (warm start)
    older: Array  # (h, d, k) those of steps k - 2, ..., k - 1 - h (the warm start's history)
    step: Array


def preconditioned_row(pairs: Eigenpairs, threshold: float, spectrum) -> dict:
    """The row fields of a measurement of P^{-1/2} H P^{-1/2}'s top pairs: ``preconditioned_sharpness``, ``edge_ratio``
    (= it / ``threshold``) and those of :func:`~eosflow.spectrum.measured_row` (``eigenvalues``, ``hvps``,
    ``measurement_hvps``, ``residual``)."""
    return {
        "preconditioned_sharpness": pairs.values[0],
        "edge_ratio": pairs.values[0] / threshold,
        **measured_row(pairs, spectrum),
    }


def second_difference(new: Array, w: Array, previous: Array, step: Array) -> Array:
    """|w_{k+1} - 2 w_k + w_{k-1}| / 4: the period-2 oscillation |delta_k| (NaN at k = 0), as GD's."""
    return jnp.where(step > 0, 0.25 * jnp.linalg.norm(new - 2.0 * w + previous), jnp.nan)


class AdaptiveOptimizer(ScannedProcess):
    objective: Objective
    rule: UpdateRule = eqx.field(static=True)
    warm_start: WarmStart = eqx.field(static=True, default="fitted")  # the eigensolver's start (gd_warm_start)

    def init(self, w0: Array) -> OptimizerState:
        vectors = self.initial_vectors(w0)
        older = start_history(vectors, self.warm_start)
        return OptimizerState(w0, w0, w0, self.rule.init(w0), vectors, older, jnp.asarray(0))

    def growth_threshold(self) -> float:
        """Track one more eigenpair once all exceed the same fraction of the edge as GD's threshold/lr of 2/lr."""
        return 0.5 * self.spectrum.threshold * self.rule.threshold(self.lr)

    def step(self, state: OptimizerState) -> tuple[OptimizerState, dict[str, Array]]:
        w = state.w
        history = jnp.concatenate([state.vectors[None], state.older])  # (h + 1, d, k)
        start = state.vectors
        if self.spectrum.every == 1:  # then history holds the measurements of steps k - 1, k - 2, ...
            # step k - 2's vectors when w_{k-2} is nearer than w_{k-1}: the iterates bounce (GD's test is the
            # gradient's flip; through a momentum the flip can be filtered out while w drifts)
            nearer = jnp.linalg.norm(w - state.before) < jnp.linalg.norm(w - state.previous)
            start = gd_warm_start(history, nearer & (state.step > 1), self.warm_start)

        def preconditioner(grad: Array) -> Array:  # P_{k+1} of the step being taken, which reads g_k
            return self.rule.preconditioner(self.rule.moments(state.rule, grad), w)

        (loss, grad), pairs = value_grad_and_tracked(
            self.objective, w, start, state.step, self.spectrum, preconditioner=preconditioner
        )
        rule_state = self.rule.moments(state.rule, grad)
        new_w = w - self.lr * self.rule.direction(rule_state, grad) / self.rule.preconditioner(rule_state, w)
        vectors, row = (
            carried(pairs, self.spectrum.carry, state.vectors),
            preconditioned_row(pairs, self.rule.threshold(self.lr), self.spectrum),
        )
        row.update(
            loss=loss,
            grad_norm=jnp.linalg.norm(grad),
            position=w,
            grads=jnp.asarray(1, jnp.int32),
            oscillation=second_difference(new_w, w, state.previous, state.step),
            step_norm=jnp.linalg.norm(new_w - w),
        )
        return OptimizerState(new_w, w, state.previous, rule_state, vectors, history[:-1], state.step + 1), row


OPTIMIZERS = {  # name -> (options, summary)
    "momentum": (MomentumOptions, "heavy-ball momentum (classical or EMA form)"),
    "nesterov": (NesterovOptions, "Nesterov momentum, w <- w - lr (g + beta v)"),
    "rmsprop": (RMSPropOptions, "RMSProp, diagonal or scalar: w <- w - lr g / (sqrt(nu) + eps)"),
    "adam": (AdamOptions, "Adam: w <- w - lr m_hat / (sqrt(nu_hat + eps_root) + eps)"),
}


def _register(name: str, options: type, summary: str) -> None:
    @register_process(name, options, summary, discrete=True)
    def build(problem, spec, options) -> AdaptiveOptimizer:
        return AdaptiveOptimizer(
            **scanned_fields(name, spec, problem.objective),
            rule=options.rule(),
            warm_start=options.warm_start,
        )


for _name, (_options, _summary) in OPTIMIZERS.items():
    _register(_name, _options, _summary)
