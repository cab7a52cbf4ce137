"""An optax wrapper that measures the (preconditioned) sharpness every N steps and logs lr * S.

    opt = eosflow.monitor.monitored(eosflow.optimizer_edges.adam(1e-3), loss_fn, every=10)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, batch=batch)      # inside jit or scan

Every ``every``-th update measures, at ``params`` and on ``batch``, the top eigenvalue S of
P^{-1/2} H P^{-1/2} with P the preconditioner the inner optimizer just used (P = I for SGD), and
passes a :class:`Reading` to ``log`` on the host (``jax.debug.callback``); the latest reading
is also in ``state.reading``. ``edge_ratio`` = S / threshold is 1 at the optimizer's edge of
stability (lr * S = 2 for GD, 38 for Adam at b1 = 0.9). With a schedule, lr is the one of the
update made (the count optax's schedule state holds: under ``optax.MultiSteps``, the inner optimizer's); an
``optax.inject_hyperparams`` optimizer's lr, betas, eps, momentum and weight decay are the ones its state says
it used (set by hand or by a schedule). Extra arguments of ``update`` go to the inner transform.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array

from eosflow.optimizer_edges import EdgeOptimizer, injected, substate
from eosflow.seeds import seed_key
from eosflow.tracker import SharpnessTracker, TrackerState


class Reading(NamedTuple):
    """One measurement: the step it was taken at and the sharpness in three units."""

    step: Array  # the update's index (0-based)
    sharpness: Array  # S, the top eigenvalue of P^{-1/2} H P^{-1/2}
    lr_sharpness: Array  # lr * S
    edge_ratio: Array  # S / threshold (1 at the edge of stability)
    adaptive: Array | bool = False  # P estimated from the gradients (Adam, RMSProp): a start transient, edge_log
    converged: Array | bool = True  # every residual <= tol (False: LOBPCG stopped at max_iters; S a lower bound)


class MonitoredState(NamedTuple):
    inner: optax.OptState  # the wrapped optimizer's state
    tracker: TrackerState  # warm start and last eigenpairs (d x k)
    reading: Reading  # the latest measurement (NaN before the first)


def applied_lr(optimizer: EdgeOptimizer, opt_state: optax.OptState, step: Array) -> Array:
    """The step size of the update just made: an ``optax.inject_hyperparams`` state's ``learning_rate`` (set by hand
    or a schedule's value), else the schedule at the count of the last update its state made (``count - 1`` of
    optax's ``ScaleByScheduleState``: under ``optax.MultiSteps`` the inner optimizer's, not the micro-step's),
    else at ``step``; a constant lr as it is."""
    lr = injected(opt_state, learning_rate=None)["learning_rate"]
    if lr is not None:
        return jnp.asarray(lr)
    scheduled = substate(opt_state, lambda s: isinstance(s, optax.ScaleByScheduleState))
    if callable(optimizer.lr) and scheduled is not None:
        step = jnp.maximum(scheduled.count - 1, 0)
    return optimizer.lr_at(step)


def print_reading(reading: Reading) -> None:
    """The default ``log``: one line per measurement."""
    print(
        f"step {int(reading.step):6d}  S = {float(reading.sharpness):.5g}  lr*S = {float(reading.lr_sharpness):.4f}  "
        f"S/threshold = {float(reading.edge_ratio):.4f}" + ("" if bool(reading.converged) else "  (not converged)")
    )


def monitored(
    optimizer: EdgeOptimizer,
    loss_fn: Callable,
    every: int = 10,
    k: int = 1,
    tol: float = 1e-3,
    max_iters: int = 30,
    seed: int = 0,
    log: Callable[[Reading], None] | None = print_reading,
) -> optax.GradientTransformationExtraArgs:
    """``optimizer``'s transformation, measuring its edge every ``every`` updates (see the module doc).

    ``loss_fn(params, batch)`` is the loss the sharpness is of; ``update`` takes the batch as the
    keyword ``batch`` (omit it for ``loss_fn(params)``). ``log=None`` only records the reading: a ``log`` is a
    ``jax.debug.callback`` in every step's program, and makes each step call wait for the step to run.

    Not inside an ``nnx.Optimizer``: it hands the update the Params as an ``nnx.State`` and the module's
    other variables not at all, so a module's loss cannot be evaluated there. Measure a Flax NNX module with
    :class:`eosflow.SharpnessTracker` in the training loop (docs/monitor.md, "A Flax NNX loop").
    """
    if not isinstance(optimizer, EdgeOptimizer):
        raise TypeError(
            "eosflow.monitor.monitored wraps an optimizer that knows its preconditioner and edge threshold: "
            "eosflow.optimizer_edges.adam(lr, ...), .adamw, .sgd or .rmsprop (each builds the optax transformation), "
            f"got {type(optimizer).__name__}"
        )
    if log is not None and not callable(log):
        raise TypeError(
            "eosflow.monitor.monitored: log must be a function of the Reading, an eosflow.edge_log.EdgeLog or None, "
            f"got {type(log).__name__} {log!r}"
            + (": for a file, pass log=EdgeLog(path)" if isinstance(log, str) else "")
        )
    tracker = SharpnessTracker(loss_fn, k=k, tol=tol, max_iters=max_iters, every=every)
    adaptive = jnp.asarray(optimizer.preconditioner is not None)

    def init(params):
        inner = optimizer.transform.init(params)
        state = tracker.init(params, seed_key(seed))
        nan = jnp.full((), jnp.nan, state.values.dtype)
        unread = Reading(jnp.asarray(-1, jnp.int32), nan, nan, nan, adaptive, jnp.asarray(True))
        return MonitoredState(inner, state, unread)

    def update(updates, state: MonitoredState, params=None, *, batch: Any = None, **extra_args):
        if params is None:
            raise ValueError(
                "eosflow.monitor.monitored: update() needs params (the point the sharpness is measured at)"
            )
        updates, inner = optimizer.transform.update(updates, state.inner, params, **extra_args)
        preconditioner = None if optimizer.preconditioner is None else optimizer.preconditioner(inner)
        step = state.tracker.count
        tracked, pairs = _measure(tracker, state.tracker, params, batch, preconditioner)
        sharpness = pairs.values[0]
        lr = applied_lr(optimizer, inner, step).astype(sharpness.dtype)
        converged = jnp.all(pairs.residuals <= jnp.asarray(tol, pairs.residuals.dtype))
        measured = Reading(step, sharpness, lr * sharpness, sharpness / optimizer.edge(lr, inner), adaptive, converged)
        is_measurement = pairs.hvps > 0
        reading = jax.tree.map(lambda new, old: jnp.where(is_measurement, new, old), measured, state.reading)
        if log is not None:
            jax.lax.cond(is_measurement, lambda r: jax.debug.callback(log, r), lambda r: None, measured)
        return updates, MonitoredState(inner, tracked, reading)

    return optax.GradientTransformationExtraArgs(init, update)


def _measure(tracker: SharpnessTracker, state: TrackerState, params, batch, preconditioner):
    """``tracker.update``; a loss that fails on the ``nnx.State`` of an ``nnx.Optimizer`` gets the way that works."""
    nnx = sys.modules.get("flax.nnx")  # never imported here: an nnx.State means the user's process loaded flax
    if nnx is None or not isinstance(params, nnx.State):
        return tracker.update(state, params, batch, preconditioner)
    try:
        return tracker.update(state, params, batch, preconditioner)
    except (TypeError, AttributeError) as error:
        raise TypeError(
            "eosflow.monitor.monitored inside an nnx.Optimizer: it passes the Params as an nnx.State, without the "
            f"module's other variables, and loss_fn failed on it ({type(error).__name__}: {error}). Measure the "
            "module with eosflow.SharpnessTracker in the training loop instead: tracker.update(state, model, batch, "
            "preconditioner=opt.preconditioner(optimizer.opt_state)) (docs/monitor.md, 'A Flax NNX loop')"
        ) from error
