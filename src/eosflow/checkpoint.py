"""A training run's own state as the start of eosflow's optimizer: models from your checkpoint.

    ckpt = eosflow.checkpoint.Checkpoint(params, opt_state)        # from your optax loop, at any step
    ds = eosflow.anchored.anchored(table, at=2, problem=problem, start=ckpt)

:func:`optimizer_state` turns the parameters and optax state of a training run (GD: no state;
``optax.sgd`` with momentum or Nesterov; EMA momentum as ``optax.ema(beta, debias=False)``;
``optax.rmsprop``; ``optax.adam``) into the state of the spec's first process, so that
:func:`eosflow.anchored.anchored` runs that optimizer on from there (its iterates continue the user's: the
test checks them against optax to 1e-12) and starts its models ``at`` steps later on its own states. The
moments map one to one, in optax's conventions, which eosflow's rules share (docs/adaptive.md section 1):
Adam's ``ScaleByAdamState(count, mu, nu)`` is (m, nu, count) with the same bias correction;
``TraceState(trace)`` is the classical and Nesterov buffer m, ``EmaState`` the EMA form's m;
``ScaleByRmsState(nu)`` is RMSProp's nu (and its count, bias-corrected). The hyperparameters (lr, betas,
eps) are the spec's: optax keeps them in closures, not in its state, so they cannot be read from it and
must be given as in the optax call; under ``optax.inject_hyperparams`` the state keeps them, and
:func:`injected_settings` reads them for :func:`check_settings`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.config import SpecError
from eosflow.objective import Unravel, differentiable_part, ravel
from eosflow.optim.adaptive import AdaptiveOptimizer, RuleState
from eosflow.optim.gd import GradientDescent
from eosflow.optimizer_edges import injected_state, is_injected, substate

PyTree = Any


class Checkpoint(NamedTuple):
    """Parameters (a pytree shaped like the problem's) and, for momentum, RMSProp or Adam, the optax state
    that trained them (``None`` for GD). ``previous``: the parameters one step earlier, if kept (only the
    first step's ``oscillation`` reads them). ``settings``: the training run's optimizer in the spec's terms,
    where it can be read (``{"process": "adam", "lr": 1e-3, "options": {"beta1": 0.9, ...}}``; torch keeps
    them, optax does not), checked against the spec by :func:`check_settings`."""

    params: PyTree
    opt_state: Any = None
    previous: PyTree | None = None
    settings: dict | None = None


# optax's names of the hyperparameters that ``optax.inject_hyperparams`` keeps in its state -> each process's option
INJECTED = {
    "gd": {},
    "momentum": {"momentum": "beta"},  # optax.sgd(lr, momentum)
    "nesterov": {"momentum": "beta"},
    "rmsprop": {"decay": "beta2"},  # its eps sits inside or outside the root by a flag the state does not keep
    "adam": {"b1": "beta1", "b2": "beta2", "eps": "eps", "eps_root": "eps_root"},
}


def injected_settings(name: str, opt_state: Any) -> dict | None:
    """The settings of ``optax.inject_hyperparams(...)`` in ``opt_state`` in the terms of process ``name`` (the
    learning rate it last applied, and the betas and eps it keeps; ``INJECTED``), or None without such a state.
    optax keeps the hyperparameters of any other transformation in closures, where they cannot be read."""
    injected = injected_state(opt_state)
    if injected is None or not isinstance(injected.hyperparams, dict):
        return None
    hyperparams = injected.hyperparams
    if name == "rmsprop" and hyperparams.get("momentum") is not None:
        raise SpecError("checkpoint.opt_state: an optax.rmsprop with momentum; eosflow's rmsprop has none")
    options = {ours: hyperparams[theirs] for theirs, ours in INJECTED.get(name, {}).items() if theirs in hyperparams}
    return {"process": name, "lr": hyperparams.get("learning_rate"), "options": options}


def _without_injected(opt_state: Any) -> Any:
    """``opt_state`` with every ``inject_hyperparams`` state replaced by the state it wraps."""
    return jax.tree.map(lambda n: n.inner_state if is_injected(n) else n, opt_state, is_leaf=is_injected)


def check_settings(spec: Any, settings: dict | None) -> None:
    """A SpecError naming every setting of the training run's optimizer that the spec's first process contradicts:
    the optimizer would continue with other numbers than the run it starts from, without a word."""
    if settings is None:
        return
    name = spec.processes[0]
    if settings["process"] != name:
        differ = [f"the optimizer is {settings['process']!r} where the spec's first process is {name!r}"]
    else:
        given = {} if settings.get("lr") is None else {"lr": (settings["lr"], spec.lr)}
        given |= {
            f"{name}.{key}": (value, getattr(spec.options[name], key)) for key, value in settings["options"].items()
        }
        differ = [
            f"{key} = {_shown(mine)!r} where the spec has {theirs!r}"
            for key, (mine, theirs) in given.items()
            if not _same(mine, theirs)
        ]
    if differ:
        raise SpecError(
            f"the checkpoint's optimizer is not the spec's: {'; '.join(differ)}; set the spec as the run was"
        )


def _same(a: Any, b: Any) -> bool:
    """Equal settings; an array's (optax keeps float32 scalars) equal to the spec's number in its own precision."""
    if isinstance(a, np.ndarray | np.generic | jax.Array) and np.issubdtype(np.asarray(a).dtype, np.floating):
        a = np.asarray(a)
        return isinstance(b, float | int) and bool(
            np.isclose(a, np.asarray(b, a.dtype), rtol=4 * np.finfo(a.dtype).eps, atol=0)
        )
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return bool(np.isclose(a, b, rtol=1e-12, atol=0.0))
    return a == b


def _shown(value: Any) -> Any:
    return float(value) if isinstance(value, np.ndarray | np.generic | jax.Array) else value


def _flat(tree: PyTree, like: np.ndarray, where: str, problem: Any) -> jax.Array:
    """``tree`` flattened as the problem's parameters are, or a SpecError naming what differs. A module
    (Equinox, Flax NNX) counts by what it measures (:func:`differentiable_part`); a tree whose leaves sit
    at the parameters' paths with their shapes passes whatever wraps them (an ``nnx.Optimizer`` keeps its
    moments in OptVariables where the parameters are Params)."""
    tree = differentiable_part(tree)[0]
    unravel = problem.objective.unravel
    treedef = getattr(unravel, "treedef", None)
    structure = jax.tree_util.tree_structure(tree)
    if treedef is not None and structure != treedef and (mine := _paths(tree)) != (theirs := _paths(unravel)):
        differ = next(((a, b) for a, b in zip(mine, theirs) if a != b), None)
        detail = (
            f"leaf {differ[0][0]} of shape {differ[0][1]} where the parameters have {differ[1][0]} of shape "
            f"{differ[1][1]}"
            if differ
            else f"{len(mine)} leaves where the parameters have {len(theirs)}"
        )
        raise SpecError(
            f"{where}: its pytree structure is not the problem's parameters' ({detail}): {structure} against {treedef}"
        )
    flat, _ = ravel(tree, where)
    if flat.shape != like.shape:
        raise SpecError(f"{where}: {flat.shape[0]} numbers where the problem has {like.shape[0]} parameters")
    return jnp.asarray(flat, like.dtype)


def _paths(tree: PyTree) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of every leaf of ``tree``, or of the parameters an Unravel rebuilds."""
    if isinstance(tree, Unravel):
        tree = jax.tree_util.tree_unflatten(tree.treedef, [np.empty(shape, np.int8) for shape in tree.shapes])
    return [
        (jax.tree_util.keystr(path), tuple(np.shape(leaf))) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def _find(opt_state: Any, names: tuple[str, ...], what: str) -> Any:
    """The first sub-state of a (possibly chained) optax state whose type name starts with one of ``names``."""

    found = substate(opt_state, lambda node: hasattr(type(node), "_fields") and type(node).__name__.startswith(names))
    if found is None:
        raise SpecError(
            f"checkpoint.opt_state: no {' or '.join(names)} in it ({type(opt_state).__name__}): the state of {what} "
            "is needed to start it"
        )
    return found


def optimizer_state(optimizer: Any, problem: Any, checkpoint: Checkpoint) -> Any:
    """The state of ``optimizer`` (eosflow's GD or momentum / adaptive optimizer) at ``checkpoint``: its
    iterate, moments and step count; its tracked eigenvectors start afresh, as at w0."""
    like = np.asarray(problem.w0)
    w = _flat(checkpoint.params, like, "checkpoint.params", problem)
    previous = w if checkpoint.previous is None else _flat(checkpoint.previous, like, "checkpoint.previous", problem)
    state = optimizer.init(w)
    if isinstance(optimizer, GradientDescent):
        if checkpoint.opt_state is not None and jax.tree.leaves(_without_injected(checkpoint.opt_state)):
            raise SpecError("checkpoint.opt_state: GD keeps no state; pass None (or optax.sgd's empty state)")
        return state
    if not isinstance(optimizer, AdaptiveOptimizer):
        raise SpecError(f"a checkpoint starts GD or a momentum or adaptive optimizer, not {type(optimizer).__name__}")
    rule = optimizer.rule
    m, nu, count = state.rule
    if rule.form == "ema" and rule.second_moment == "diagonal":  # adam
        adam = _find(checkpoint.opt_state, ("ScaleByAdamState",), "optax.adam")
        m, nu = (_flat(adam.mu, like, "opt_state.mu", problem), _flat(adam.nu, like, "opt_state.nu", problem))
        count = jnp.asarray(adam.count, jnp.int32)
    elif rule.form in ("classical", "nesterov") and rule.second_moment == "none":  # optax.sgd(momentum=...)
        m = _flat(
            _find(checkpoint.opt_state, ("TraceState",), "optax.sgd with momentum").trace,
            like,
            "opt_state.trace",
            problem,
        )
    elif rule.form == "ema" and rule.second_moment == "none":  # optax.chain(optax.ema(b, debias=False), ...)
        m = _flat(
            _find(checkpoint.opt_state, ("EmaState",), "optax.ema(beta, debias=False)").ema,
            like,
            "opt_state.ema",
            problem,
        )
    elif rule.form == "none" and rule.second_moment == "diagonal":  # rmsprop
        rms = _find(checkpoint.opt_state, ("ScaleByRms",), "optax.rmsprop")
        nu = _flat(rms.nu, like, "opt_state.nu", problem)
        count = jnp.asarray(rms.count if "count" in rms._fields else 0, jnp.int32)  # ScaleByRmsWithCountState
    else:
        raise SpecError(
            f"no optax state maps to this optimizer's rule (momentum form {rule.form!r}, second moment "
            f"{rule.second_moment!r}): scalar RMSProp has no optax state"
        )
    return state._replace(w=w, previous=previous, before=previous, rule=RuleState(m, nu, count))
