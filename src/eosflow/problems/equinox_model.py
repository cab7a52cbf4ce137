"""An Equinox model as a problem: its floating arrays are w, its forward is vmapped over the examples.

    problem = Problem.from_equinox(model, inputs, targets, loss="mse")               # stateless model
    problem = Problem.from_equinox(model, inputs, targets, loss="mse", state=state)  # eqx.nn.make_with_state

L(w) = loss(vmap(model)(inputs), targets), with ``vmap`` over the examples under ``axis_name`` (the
name BatchNorm layers reduce over) and ``state`` (running statistics) held fixed: eosflow neither uses
the state a forward returns nor changes the user's. So BatchNorm in training mode (``inference=False``)
normalizes each batch by its own statistics, the full batch for GD and each minibatch for SGD, which is
the loss a training loop descends; in inference mode it is the affine map of the running statistics.
Dropout in training mode makes L random and is refused by its path in the model. Any other layer whose
forward replaces its state (an ``eqx.nn.StateIndex``; ``eqx.nn.SpectralNorm`` in training mode advances
its power iteration) is refused by its path: with the state held fixed every evaluation would restart
from the same state, not the loss a training loop computes; in inference mode the state is a constant.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array

from eosflow.config import SpecError
from eosflow.objective import one_example_batch_statistics

PyTree = Any


def _layers(model: PyTree, kind: type) -> list[tuple[str, Any]]:
    """(path, layer) of every ``kind`` module inside ``model`` (paths as ``model.layers[2]``)."""
    found, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda node: isinstance(node, kind))
    return [(f"model{jax.tree_util.keystr(path)}", layer) for path, layer in found if isinstance(layer, kind)]


def _child(node: Any, key: Any) -> Any:
    """``node``'s child at one key of a pytree path (None where the path is not addressable)."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    return None


def stateful_layers(model: PyTree) -> list[tuple[str, Any, str, eqx.nn.StateIndex]]:
    """(layer's path, layer, the index's path inside it, index) of every ``eqx.nn.StateIndex`` in
    ``model``; the layer is the innermost module holding the index (``model.first`` for
    ``model.first.uv_index``)."""
    found, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda node: isinstance(node, eqx.nn.StateIndex))
    layers = []
    for path, index in found:
        if not isinstance(index, eqx.nn.StateIndex):
            continue
        node, layer, depth = model, model, 0
        for i, key in enumerate(path[:-1]):
            node = _child(node, key)
            if node is None:
                break
            if isinstance(node, eqx.Module):
                layer, depth = node, i + 1
        where = f"model{jax.tree_util.keystr(path[:depth])}"
        layers.append((where, layer, jax.tree_util.keystr(path[depth:]), index))
    return layers


def check_state_updates(model: PyTree, state: Any, inputs: Array, axis_name: Any) -> None:
    """A SpecError naming every layer other than BatchNorm whose forward replaces its state (found by
    tracing the vmapped forward on ``inputs``, nothing computed: an index whose value in the returned
    state is not the object it was given): eosflow holds ``state`` fixed, so each evaluation would
    restart from it where a training loop carries every step's new state into the next. Layers whose
    state the forward only reads (inference mode) pass."""
    indices = [entry for entry in stateful_layers(model) if not isinstance(entry[1], eqx.nn.BatchNorm)]
    if state is None or not indices:
        return
    replaced: set[int] = set()

    def probe(x: Array) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(state)
        given = jax.tree_util.tree_unflatten(treedef, leaves)  # a fresh copy: an eqx State is used once
        before = [jax.tree_util.tree_leaves(given.get(index)) for *_, index in indices]
        out = model(x, given)
        after = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        if not isinstance(after, eqx.nn.State):  # not model(x, state) -> (y, state): from_model says so
            return
        for i, (old, (*_, index)) in enumerate(zip(before, indices)):
            if any(new is not value for new, value in zip(jax.tree_util.tree_leaves(after.get(index)), old)):
                replaced.add(i)

    jax.eval_shape(jax.vmap(probe, axis_name=axis_name), inputs)
    if not replaced:
        return
    layers = [indices[i] for i in sorted(replaced)]
    named = []
    for path, layer, field, _ in layers:
        kind = type(layer).__name__
        kind = f"eqx.nn.{kind}" if getattr(eqx.nn, kind, None) is type(layer) else kind
        named.append(f"{path} ({kind}, state {field})")
    spectral = any(isinstance(layer, eqx.nn.SpectralNorm) for _, layer, *_ in layers)
    fix = (
        "pass `eqx.nn.inference_mode(model)` (or inference=True on the layer), where the state is only read, "
        "a constant of the loss" + (" (SpectralNorm: W / (u^T W v) with the u, v in `state`)" if spectral else "")
        if all(hasattr(layer, "inference") for _, layer, *_ in layers)
        else "make the layer leave its state unchanged (an `inference` field, which eqx.nn.inference_mode sets)"
    )
    raise SpecError(
        f"the forward updates the state of {', '.join(named)} at every call"
        + (" (training mode: SpectralNorm advances its power iteration)" if spectral else "")
        + ". eosflow holds `state` fixed, so every evaluation would redo that update from the same state: not the "
        "loss a training loop computes (it carries each step's new state into the next)"
        + (
            ", nor one function of the weights (SpectralNorm's gradient skips the update, under stop_gradient, "
            "that its value depends on)"
            if spectral
            else ""
        )
        + f". To measure a fixed loss, {fix}; see docs/problems.md"
    )


def check_layers(model: PyTree, state: Any) -> list[tuple[str, Any]]:
    """The model's BatchNorm layers (path, layer), after refusing what has no fixed loss: dropout in
    training mode (a SpecError naming it), BatchNorm without a ``state``; an EMA-mode BatchNorm whose
    state has been trained warns, because its training forward mixes that state's running statistics in."""
    for path, layer in _layers(model, eqx.nn.Dropout):
        if not layer.inference and float(layer.p) > 0:
            raise SpecError(
                f"{path} is eqx.nn.Dropout(p={float(layer.p)}) in training mode, which makes the loss random "
                "(every evaluation draws a new mask), so it has no Hessian: pass `eqx.nn.inference_mode(model)` "
                f"or a model whose dropout has inference=True (eosflow measures the network without dropout)"
            )
    norms = _layers(model, eqx.nn.BatchNorm)
    stateful = list(dict.fromkeys(path for path, *_ in stateful_layers(model)))
    if stateful and state is None:
        kinds = "BatchNorm layers" if norms and len(norms) == len(stateful) else "layers with state"
        raise SpecError(
            f"the model has {kinds} ({', '.join(stateful)}), which need their state: "
            "build them with `model, state = eqx.nn.make_with_state(Model)(...)` and pass `state=state`"
        )
    for path, layer in norms:
        if layer.mode == "ema" and not layer.inference and not bool(np.asarray(state.get(layer.ema_first_time_index))):
            warnings.warn(
                f"{path} is eqx.nn.BatchNorm(mode='ema') in training mode with a state it has already "
                f"updated: its forward normalizes by {1 - layer.momentum:g} of the batch's statistics and "
                f"{layer.momentum:g} of the running ones in `state`, which eosflow holds fixed (a training loop "
                "moves them at every step). mode='batch' normalizes by the batch alone",
                stacklevel=4,
            )
    return norms


class EquinoxForward:
    """``forward(params, inputs)``: the model rebuilt from its floating arrays, vmapped over the rows of
    ``inputs`` (B, ...) under ``axis_name``, with ``state`` fixed; predictions (B, ...)."""

    def __init__(self, static: PyTree, state: Any, axis_name: Any, batch_statistics: list[str]):
        self.static = static
        self.state = None if state is None else jax.tree_util.tree_flatten(state)  # (leaves, treedef)
        self.axis_name = axis_name
        self.batch_statistics = tuple(batch_statistics)

    def __call__(self, params: PyTree, inputs: Array) -> Array:
        size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
        if size == 1 and self.batch_statistics:
            raise one_example_batch_statistics(
                list(self.batch_statistics), "training mode", "pass eqx.nn.inference_mode(model)"
            )
        model = eqx.combine(params, self.static)
        if self.state is None:
            return jax.vmap(model, axis_name=self.axis_name)(inputs)
        leaves, treedef = self.state
        state = jax.tree_util.tree_unflatten(treedef, leaves)  # a fresh copy: an eqx State is used once
        return jax.vmap(lambda x: model(x, state)[0], axis_name=self.axis_name)(inputs)


def split_model(model: PyTree, state: Any = None, axis_name: Any = None) -> tuple[EquinoxForward, PyTree]:
    """(forward, params): the model's floating arrays (``eqx.is_inexact_array``) and the forward that
    rebuilds it from them; checked by :func:`check_layers`. ``axis_name`` defaults to the one name the
    model's BatchNorm layers reduce over (none without them)."""
    norms = check_layers(model, state)
    batch_statistics = [path for path, layer in norms if not layer.inference]  # normalizing by the batch's
    if axis_name is None:
        names = {repr(layer.axis_name): layer.axis_name for _, layer in norms}
        if len(names) > 1:
            raise SpecError(
                f"the model's BatchNorm layers reduce over different axis names ({', '.join(sorted(names))}): "
                "pass axis_name= (the one the examples are vmapped over)"
            )
        axis_name = next(iter(names.values()), None)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return EquinoxForward(static, state, axis_name, batch_statistics), params
