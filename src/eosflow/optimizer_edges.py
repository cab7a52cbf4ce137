"""Optax optimizers with their edge of stability: the preconditioner read from the state, the threshold.

    opt = eosflow.optimizer_edges.adam(1e-3)            # opt.transform is optax.adam(1e-3)
    P = opt.preconditioner(opt_state)                   # diag(sqrt(nu_hat + eps_root) + eps), like params
    opt.threshold                                       # 38 / lr: where P^{-1/2} H P^{-1/2} hovers
    opt = eosflow.optimizer_edges.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 100, 5000))
    opt.threshold_at(count)                             # c(lr(count)) / lr(count) at the update's count

Each constructor builds the optax transformation itself, so the hyperparameters that define P and
the threshold are the ones the optimizer runs with. ``lr`` may be an optax schedule: update t
(0-based, optax's count) steps with lr(t), and its edge is where lr(t) S = c. P follows optax 0.2's
conventions exactly (read from optax/_src/transform.py):

    adam     P = sqrt(nu / (1 - b2^t) + eps_root) + eps      t = the state's count (bias correction)
    amsgrad  P = sqrt(nu_max + eps_root) + eps                nu_max = the running max of nu / (1 - b2^t)
    rmsprop  P = sqrt(nu_hat + eps)   (eps_in_sqrt = True, optax's default)
             P = sqrt(nu_hat) + eps   (eps_in_sqrt = False, PyTorch's convention)
             nu_hat = nu / (1 - decay^t) with bias_correction = True, else nu
             centered: nu_hat - mu_hat^2 in place of nu_hat (mu the EMA of g, corrected alike)
    sgd      P = I

and the threshold is :func:`eosflow.preconditioning.edge_threshold` of the momentum's form:
Adam's first moment is an EMA (c = 2 (1 + b1) / (1 - b1), 38 at b1 = 0.9); optax's ``trace``
(sgd and rmsprop momentum) is classical heavy ball (c = 2 (1 + b)) or Nesterov. AdamW's decoupled
decay w <- (1 - lr wd) w - lr m_hat / P lowers it to c (1 - lr wd / 2) / lr
(:func:`eosflow.preconditioning.decoupled_decay_factor`).

To measure inside your own chain (clipping first, say), keep P and the threshold and swap the
transform: ``optimizer_edges.adamw(schedule)._replace(transform=optax.chain(clip, optax.adamw(schedule)))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eosflow.preconditioning import (
    MomentumForm,
    decoupled_decay_factor,
    diagonal_preconditioner,
    edge_threshold,
    stability_constant,
)

PyTree = Any
LearningRate = float | Callable[[Any], Any]  # a constant or an optax schedule of the update count


class SecondMoment(NamedTuple):
    """RMSProp's (or Adam's at b1 = 0) second moment at a state, as the central flow's nu feed needs it (pytrees
    like params, but rate).

    nu_hat moves by nu_hat <- nu_hat + rate (g^2 - nu_hat) per update, and P = P(nu_hat)."""

    nu: PyTree  # nu_hat: the (bias-corrected) moment P is a function of
    preconditioner: PyTree  # P(nu_hat), what ``EdgeOptimizer.preconditioner`` reads
    slope: PyTree  # dP / dnu_hat
    rate: Any  # () per update: 1 - decay, or (1 - decay) / (1 - decay^(t+1)) with bias correction at count t


class EdgeOptimizer(NamedTuple):
    """An optax optimizer, its step size (a constant or a schedule), its edge c(lr) / lr and how to read its P."""

    transform: optax.GradientTransformation
    lr: LearningRate  # a schedule is evaluated at the update's count, as optax does
    # (lr, opt_state=None) -> the preconditioned sharpness at the edge at that lr (the state's injected betas,
    # momentum and weight decay before the constructor's: :func:`injected`)
    edge: Callable[..., Any]
    preconditioner: Callable[[optax.OptState], PyTree] | None  # P's diagonal (like params); None: P = I
    # nu_hat, P, dP/dnu_hat and nu_hat's rate: RMSProp without momentum, whose central flow is published
    second_moment: Callable[[optax.OptState], SecondMoment] | None = None

    def lr_at(self, count) -> jax.Array:
        """The step size of update ``count`` (0-based): lr, or lr(count) for a schedule."""
        return jnp.asarray(self.lr(count) if callable(self.lr) else self.lr)

    def threshold_at(self, count) -> jax.Array:
        """The edge of update ``count``: the preconditioned sharpness S at which lr(count) S = c."""
        return self.edge(self.lr_at(count))

    @property
    def threshold(self) -> float:
        """The edge c / lr of a constant step size (a schedule's moves: use ``threshold_at(count)``)."""
        if callable(self.lr):
            raise TypeError(
                "this optimizer's lr is a schedule, so its edge moves with the step: use threshold_at(count)"
            )
        return float(self.edge(self.lr))


INJECTED_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def is_injected(node: Any) -> bool:
    """Whether ``node`` is an ``optax.inject_hyperparams`` state (its ``hyperparams`` and ``inner_state``)."""
    return isinstance(node, INJECTED_STATES)


def injected_state(opt_state: optax.OptState | None) -> Any | None:
    """The ``optax.inject_hyperparams`` state inside ``opt_state``, or None."""
    return None if opt_state is None else substate(opt_state, is_injected)


def injected(opt_state: optax.OptState | None, **defaults: Any) -> dict[str, Any]:
    """``defaults`` (by optax's names: learning_rate, b1, b2, eps, momentum, decay, weight_decay), each replaced by
    the value an ``optax.inject_hyperparams`` state inside ``opt_state`` holds for it (set by hand or by a
    schedule): the numbers the optimizer runs with. Without such a state, ``defaults``."""
    found = injected_state(opt_state)
    held = {} if found is None else found.hyperparams
    return {key: default if held.get(key) is None else held[key] for key, default in defaults.items()}


def _positive(lr: LearningRate) -> LearningRate:
    """``lr`` itself, after refusing a constant that is not positive (a schedule is checked where evaluated)."""
    if not callable(lr):
        edge_threshold(lr)  # raises ValueError naming lr
    return lr


def _trace_edge(momentum: float, nesterov: bool) -> Callable[..., Any]:
    """The edge of optax's ``trace`` momentum (sgd's, rmsprop's), c / lr at the state's injected momentum or
    ``momentum``; a momentum outside [0, 1) is refused here, by name."""
    stability_constant(momentum)
    form: MomentumForm = "nesterov" if nesterov else "classical"  # (the same c at momentum 0)
    return lambda rate, opt_state=None: (
        stability_constant(injected(opt_state, momentum=momentum)["momentum"], form) / rate
    )


def sgd(lr: LearningRate, momentum: float = 0.0, nesterov: bool = False) -> EdgeOptimizer:
    """optax.sgd: threshold 2/lr, 2 (1 + b)/lr with heavy-ball momentum b (Nesterov: 2 (1 + b) / ((1 + 2b) lr))."""
    transform = optax.sgd(_positive(lr), momentum=momentum or None, nesterov=nesterov)
    return EdgeOptimizer(transform, lr, _trace_edge(momentum, nesterov), None)


def adam(
    lr: LearningRate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> EdgeOptimizer:
    """optax.adam: threshold 2 (1 + b1) / ((1 - b1) lr) = 38/lr at b1 = 0.9."""
    return adamw(lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=0.0)


def adamw(
    lr: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: Any = None,
) -> EdgeOptimizer:
    """optax.adamw (optax.adam at weight_decay = 0): threshold 2 (1 + b1) (1 - lr wd / 2) / ((1 - b1) lr).

    With a ``mask`` the threshold still assumes that every parameter decays: the masked iteration has
    no common eigenbasis, and the two differ by at most the factor 1 - lr wd / 2.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if weight_decay:
        transform = optax.adamw(
            _positive(lr), b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask
        )
    else:
        transform = optax.adam(_positive(lr), b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    stability_constant(b1, "ema")  # refuses a b1 outside [0, 1) by name

    def edge(rate, opt_state=None):
        held = injected(opt_state, b1=b1, weight_decay=weight_decay)
        return stability_constant(held["b1"], "ema") * decoupled_decay_factor(rate * held["weight_decay"]) / rate

    def moment(state):
        return injected(state, b2=b2, eps=eps, eps_root=eps_root)

    return EdgeOptimizer(
        transform,
        lr,
        edge,
        lambda state: adam_preconditioner(state, **moment(state)),
        # at b1 = 0 (and no decay) Adam is RMSProp with bias correction: m_hat = g
        None if b1 or weight_decay else lambda state: adam_second_moment(state, **moment(state)),
    )


def amsgrad(
    lr: LearningRate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> EdgeOptimizer:
    """optax.amsgrad: Adam with P = sqrt(nu_max + eps_root) + eps, nu_max the running max of the bias-corrected
    nu; with P held, its linearized iteration is Adam's, so the threshold is 2 (1 + b1) / ((1 - b1) lr)."""
    stability_constant(b1, "ema")  # refuses a b1 outside [0, 1) by name
    return EdgeOptimizer(
        optax.amsgrad(_positive(lr), b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        lr,
        lambda rate, opt_state=None: stability_constant(injected(opt_state, b1=b1)["b1"], "ema") / rate,
        lambda state: amsgrad_preconditioner(state, **injected(state, eps=eps, eps_root=eps_root)),
    )


def rmsprop(
    lr: LearningRate,
    decay: float = 0.9,
    eps: float = 1e-8,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    momentum: float = 0.0,
    nesterov: bool = False,
    centered: bool = False,
) -> EdgeOptimizer:
    """optax.rmsprop: threshold 2/lr, or 2 (1 + b)/lr with momentum b (P held, centered or not)."""
    transform = optax.rmsprop(
        _positive(lr),
        decay=decay,
        eps=eps,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction,
        momentum=momentum or None,
        nesterov=nesterov,
        centered=centered,
    )

    def second_moment(state):
        held = injected(state, decay=decay, eps=eps)
        return rmsprop_second_moment(state, held["decay"], held["eps"], eps_in_sqrt, bias_correction)

    def centered_preconditioner(state):
        held = injected(state, decay=decay, eps=eps)
        inside, outside = (held["eps"], 0.0) if eps_in_sqrt else (0.0, held["eps"])
        return centered_rmsprop_preconditioner(state, held["decay"], inside, outside, bias_correction)

    return EdgeOptimizer(
        transform,
        lr,
        _trace_edge(momentum, nesterov),
        centered_preconditioner if centered else lambda state: second_moment(state).preconditioner,
        None if momentum or centered else second_moment,  # the central flow is published for the uncentered one
    )


def centered_rmsprop_preconditioner(
    opt_state: optax.OptState, decay: float, inside: float, outside: float, corrected: bool
):
    """P = sqrt(nu_hat - mu_hat^2 + inside) + outside from the ScaleByRStdDevState of a centered optax.rmsprop (eps
    inside the root with ``eps_in_sqrt``, else outside): the gradient's running standard deviation, mu_hat and
    nu_hat divided by 1 - decay^t if ``corrected``."""
    state = _find(opt_state, _is_stddev_state, "a centered optax.rmsprop (ScaleByRStdDevState)")
    c = bias_correction(state.count, decay) if corrected else 1.0
    return jax.tree.map(
        lambda mu, nu: diagonal_preconditioner(nu / c - jnp.square(mu / c), outside, inside), state.mu, state.nu
    )


def adam_preconditioner(
    opt_state: optax.OptState, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> PyTree:
    """P = sqrt(nu / (1 - b2^t) + eps_root) + eps from the ScaleByAdamState inside ``opt_state``."""
    adam_state = _find(opt_state, lambda s: isinstance(s, optax.ScaleByAdamState), "an optax.adam (ScaleByAdamState)")
    correction = bias_correction(adam_state.count, b2)
    return jax.tree.map(lambda nu: diagonal_preconditioner(nu, eps, eps_root, correction), adam_state.nu)


def amsgrad_preconditioner(opt_state: optax.OptState, eps: float = 1e-8, eps_root: float = 0.0) -> PyTree:
    """P = sqrt(nu_max + eps_root) + eps from the ScaleByAmsgradState inside ``opt_state`` (nu_max is already
    bias-corrected: optax takes the max of nu / (1 - b2^t))."""
    state = _find(
        opt_state, lambda s: isinstance(s, optax.ScaleByAmsgradState), "an optax.amsgrad (ScaleByAmsgradState)"
    )
    return jax.tree.map(lambda nu_max: diagonal_preconditioner(nu_max, eps, eps_root), state.nu_max)


def rmsprop_second_moment(
    opt_state: optax.OptState,
    decay: float = 0.9,
    eps: float = 1e-8,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> SecondMoment:
    """:class:`SecondMoment` from the ScaleByRmsState (or ScaleByRmsWithCountState) inside ``opt_state``: P =
    sqrt(nu_hat + eps) (eps_in_sqrt) or sqrt(nu_hat) + eps; with bias correction nu_hat = nu / (1 - decay^t) at
    count t, else nu_hat = nu (:func:`ema_second_moment`)."""
    rms_state = _find(opt_state, _is_rms_state, "an optax.rmsprop (ScaleByRmsState)")
    inside, outside = (eps, 0.0) if eps_in_sqrt else (0.0, eps)
    count = rms_state.count if bias_correction else None
    return ema_second_moment(rms_state.nu, count, decay, inside, outside)


def adam_second_moment(
    opt_state: optax.OptState, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> SecondMoment:
    """:class:`SecondMoment` from the ScaleByAdamState inside ``opt_state``: nu_hat = nu / (1 - b2^t), P =
    sqrt(nu_hat + eps_root) + eps (:func:`ema_second_moment`); Adam's whole update at b1 = 0."""
    adam_state = _find(opt_state, lambda s: isinstance(s, optax.ScaleByAdamState), "an optax.adam (ScaleByAdamState)")
    return ema_second_moment(adam_state.nu, adam_state.count, b2, eps_root, eps)


def ema_second_moment(nu: PyTree, count: Any, decay: float, inside: float, outside: float) -> SecondMoment:
    """:class:`SecondMoment` of an EMA nu <- decay nu + (1 - decay) g^2 and P = sqrt(nu_hat + inside) + outside, so
    dP/dnu_hat = 1 / (2 sqrt(nu_hat + inside)). Bias-corrected at ``count`` t (None: not corrected), nu_hat = nu /
    (1 - decay^t) is an EMA of g^2 at the rate (1 - decay) / (1 - decay^(t+1)); uncorrected, nu_hat = nu, at 1 - decay.
    NumPy leaves (a torch optimizer's state) stay NumPy in their dtype, as in :func:`diagonal_preconditioner`.
    """
    if count is None:
        correction, rate = 1.0, 1.0 - decay  # a Python float: exact in any dtype it meets
    else:
        correction, rate = bias_correction(count, decay), (1.0 - decay) / _one_minus_power(decay, count + 1)

    def slope(nu_hat):
        xp = np if isinstance(nu_hat, np.ndarray) else jnp
        root = xp.sqrt(nu_hat + inside)
        return 0.5 / xp.maximum(root, xp.finfo(root.dtype).tiny)

    nu_hat = jax.tree.map(lambda leaf: leaf / correction, nu)
    return SecondMoment(
        nu_hat,
        jax.tree.map(lambda leaf: diagonal_preconditioner(leaf, outside, inside), nu_hat),
        jax.tree.map(slope, nu_hat),
        rate,
    )


def bias_correction(count: Any, decay: float) -> Any:
    """1 - decay^t at an optax state's ``count`` t. A concrete count of 0 (a state no update has made: nu_hat =
    0 / 0) is a ValueError; a traced one is not checked (the state inside a jitted step has made one)."""
    try:
        concrete = int(count)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        concrete = None  # traced, also inside a wrapper (an nnx.Variable under nnx.jit): not checked
    if concrete == 0:
        raise ValueError(
            "the optimizer's state has count 0: no update has made its second moment yet, and the bias-corrected "
            "nu / (1 - b2^0) is 0 / 0. Read P (or the second moment) from the state after an update"
        )
    return _one_minus_power(decay, count)


def _one_minus_power(decay: Any, count: Any) -> Any:
    """1 - decay^count. A concrete JAX count (a state read outside jit) goes through :data:`_jitted_one_minus_power`,
    as a traced one does inside the user's jitted step: eagerly, jnp's ``decay ** count`` is an ``integer_pow``
    specialized on the count's value, new programs compiled at every step (two a step, 57 ms, in a probe) whose
    digits differ from the jitted ``pow``'s. A Python or NumPy count (a torch optimizer's) stays Python's or
    NumPy's power."""
    if isinstance(count, jax.Array) and not isinstance(count, jax.core.Tracer):
        return _jitted_one_minus_power(decay, count)
    return 1.0 - decay**count


_jitted_one_minus_power = jax.jit(lambda decay, count: 1.0 - decay**count)


def _is_stddev_state(state) -> bool:
    """optax's ScaleByRStdDevState(mu, nu) or ScaleByRStdDevWithCountState(count, mu, nu) (centered RMSProp)."""
    return type(state).__name__.startswith("ScaleByRStdDev") and "mu" in getattr(type(state), "_fields", ())


def _is_rms_state(state) -> bool:
    """optax's ScaleByRmsState(nu) or ScaleByRmsWithCountState(count, nu) (the latter is not exported)."""
    fields = getattr(type(state), "_fields", ())
    return type(state).__name__.startswith("ScaleByRms") and "nu" in fields


def substate(opt_state: optax.OptState, matches: Callable[[Any], bool]) -> Any | None:
    """The first sub-state for which ``matches`` holds in a (possibly chained) optax state, or None."""
    return next((s for s in jax.tree.leaves(opt_state, is_leaf=matches) if matches(s)), None)


def _find(opt_state: optax.OptState, matches: Callable[[Any], bool], what: str):
    """:func:`substate`, or a ValueError naming the second moment's state expected."""
    found = substate(opt_state, matches)
    if found is None:
        centered = substate(opt_state, _is_stddev_state) is not None
        raise ValueError(
            f"this optax state holds no second moment: expected the state of {what}, got {type(opt_state).__name__}"
            + ("; it holds a centered RMSProp's: optimizer_edges.rmsprop(..., centered=True)" if centered else "")
        )
    return found
