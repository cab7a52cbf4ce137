"""The loss over one flat parameter vector, and its derivatives.

An :class:`Objective` wraps ``loss_on(w, batch) -> scalar`` where ``w`` is a flat vector and
``batch`` a pytree of arrays whose leaves share a leading example axis (or ``None`` for a
deterministic toy). Everything downstream (spectra, optimizers, flows) consumes an Objective:

    L(w)          = loss_on(w, data)
    g(w)          = grad L(w)
    H(w) v        = d/de g(w + e v)                       (forward-over-reverse)
    D^3 L[u, v]   = grad_w (u^T H(w) v)                   (a vector; one jvp of the HVP)

Objectives are Equinox modules: the data are traced arrays, the functions static, so one
compilation serves any dataset of the same shape, and methods inline into callers' jit.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from eosflow.config import SpecError
from eosflow.derivative_chain import forward_differentiable
from eosflow.precision import warn_half_precision
from eosflow.tracing import equations

PyTree = Any


def mse(predictions: Array, targets: Array) -> Array:
    """Half squared error summed over outputs, averaged over examples: mean_i 1/2 |f(x_i) - y_i|^2."""
    residual = (predictions - targets).reshape(predictions.shape[0], -1)
    return 0.5 * jnp.mean(jnp.sum(residual**2, axis=-1))


def sse(predictions: Array, targets: Array) -> Array:
    """Squared error summed over outputs, averaged over examples: mean_i |f(x_i) - y_i|^2."""
    return 2.0 * mse(predictions, targets)


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Softmax cross-entropy averaged over examples (and output positions, for sequences of logits).

    ``targets`` are integer labels (the logits' shape without the class axis) or one-hot rows.
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if targets.ndim == logits.ndim:
        return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1))


LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "mse": mse,
    "sse": sse,
    "cross_entropy": cross_entropy,
}


@runtime_checkable
class ObjectiveProtocol(Protocol):
    """The small interface consumers of a loss over a flat vector w rely on (an :class:`Objective`
    here; a PyTorch implementation can sit behind the same three methods)."""

    def value_and_grad(self, w: Array) -> tuple[Array, Array]: ...

    def hvp(self, w: Array, v: Array) -> Array: ...

    def third_derivative(self, w: Array, u: Array, v: Array) -> Array: ...


class Objective(eqx.Module):
    """A scalar loss of one flat parameter vector, with jitted derivatives.

    Attributes:
        loss_on: ``loss_on(w, batch)``, the mean loss of ``w`` on a batch (a callable pytree).
        data: the full training batch (a pytree with a leading example axis), or None.
        unravel: maps a flat vector back to the model's parameter pytree (static).
        microbatch: evaluate the full-batch loss in chunks of this many examples,
            L = sum_c (n_c / N) L_c, each chunk rematerialized in the backward pass, so that the
            gradient, HVPs and third derivatives hold one chunk's activations at a time (None: the
            whole batch at once). Requires a loss that is a mean over examples.
    """

    loss_on: Callable[[Array, PyTree], Array]
    data: PyTree
    unravel: Callable[[Array], PyTree] = eqx.field(static=True)
    microbatch: int | None = eqx.field(static=True, default=None)

    @classmethod
    def from_function(cls, fn: Callable[[Array], Array]) -> Objective:
        """A deterministic objective ``L(w) = fn(w)`` (no data, no minibatches)."""
        return cls(loss_on=_ignore_batch(fn), data=None, unravel=_identity)

    @classmethod
    def from_model(
        cls,
        model: Callable[[PyTree, Array], Array],
        params: PyTree,
        inputs: Array,
        targets: Array,
        loss: str | Callable[[Array, Array], Array] = "mse",
    ) -> tuple[Objective, Float[Array, " d"]]:
        """Objective of ``loss(model(params, inputs), targets)``; returns it with the flat ``w0``.

        A model that calls a ``jax.custom_vjp`` function is differentiated in reverse mode only, and one
        that computes in half precision warns (:func:`differentiable_loss`)."""
        w0, unravel = ravel(params)
        loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
        loss_on: Callable[[Array, PyTree], Array] = ModelLoss(model=model, unravel=unravel, loss=loss_fn)
        try:
            traced = equations(loss_on, w0, (inputs, targets))
        except Exception:  # a model that does not trace: named by the first call (Problem.from_model checks it)
            return cls(loss_on=loss_on, data=(inputs, targets), unravel=unravel), w0
        loss_on = differentiable_loss(loss_on, traced, "loss(model(params, inputs), targets)")
        return cls(loss_on=loss_on, data=(inputs, targets), unravel=unravel), w0

    # ---- full-batch quantities -------------------------------------------------------------
    def value(self, w: Array) -> Array:
        """L(w) (in chunks of ``microbatch`` examples, if set)."""
        if self.microbatch is None or self.data is None:
            return self.loss_on(w, self.data)
        return chunked_mean(self.loss_on, w, self.data, self.microbatch)

    def grad(self, w: Array) -> Array:
        """g(w) = grad L(w)."""
        return jax.grad(self.value)(w)

    def value_and_grad(self, w: Array) -> tuple[Array, Array]:
        """(L(w), g(w)) in one pass."""
        return jax.value_and_grad(self.value)(w)

    def hvp(self, w: Array, v: Array) -> Array:
        """H(w) v by forward-over-reverse differentiation (about two gradients' cost)."""
        return jax.jvp(self.grad, (w,), (v,))[1]

    def hvp_batch(self, w: Array, vectors: Float[Array, "d k"]) -> Float[Array, "d k"]:
        """H(w) V for the columns of V, vectorized over columns (one linearization of g)."""
        _, hvp_lin = jax.linearize(self.grad, w)
        return jax.vmap(hvp_lin, in_axes=1, out_axes=1)(vectors)

    def third_derivative(self, w: Array, u: Array, v: Array) -> Array:
        """D^3 L(w)[u, v, .] = grad_w (u^T H(w) v)."""
        return jax.jvp(lambda x: self.hvp(x, v), (w,), (u,))[1]

    def hessian(self, w: Array) -> Float[Array, "d d"]:
        """The dense Hessian (for oracles and small problems only)."""
        return jax.hessian(self.value)(w)

    # ---- stochastic quantities -------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        """N, the examples' axis every leaf of the data shares (:func:`example_count`: a leaf without it is named)."""
        if self.data is None:
            raise ValueError("this objective has no data, so it has no examples to sample")
        return example_count(self.data, "sampling examples")

    def batch_grad(self, w: Array, indices: Array) -> Array:
        """Gradient of the mean loss over the examples ``indices``."""
        batch = jax.tree_util.tree_map(lambda leaf: leaf[indices], self.data)
        return self.with_data(batch).grad(w)  # (in chunks of microbatch examples, if set)

    def per_example_grads(self, w: Array, indices: Array | None = None) -> Float[Array, "n d"]:
        """Gradients of the individual examples' losses (rows), for noise covariances; vectorized over
        ``microbatch`` examples at a time, if set (the rows, n x d, are the output whatever it is)."""
        data = self.data
        if indices is not None:
            data = jax.tree_util.tree_map(lambda leaf: leaf[indices], data)

        def one(example):
            batch = jax.tree_util.tree_map(lambda leaf: leaf[None], example)
            return jax.grad(self.loss_on)(w, batch)

        if self.microbatch is None:
            return jax.vmap(one)(data)
        return jax.lax.map(one, data, batch_size=self.microbatch)

    def with_microbatch(self, size: int | None) -> Objective:
        """The same loss evaluated in chunks of ``size`` examples (None: all at once)."""
        return dataclasses.replace(self, microbatch=size)

    def with_data(self, data: PyTree) -> Objective:
        """The same loss on other data (e.g. a held-out split)."""
        return eqx.tree_at(lambda o: o.data, self, data, is_leaf=lambda x: x is None)


def check_loss_call(loss_fn: Callable, batch: Any, where: str) -> str:
    """The call eosflow makes, ``"loss_fn(params, batch)"`` (or ``"loss_fn(params)"`` without a batch), for its
    messages; a TypeError saying so when ``loss_fn``'s signature cannot take that call, before a trace fails inside
    it (nothing is checked for a callable whose signature cannot be read: the call itself then says)."""
    arguments = ("params",) if batch is None else ("params", "batch")
    call = f"loss_fn({', '.join(arguments)})"
    try:
        signature = inspect.signature(loss_fn, follow_wrapped=False)  # a wrapper may take other arguments
    except (TypeError, ValueError):
        return call
    try:
        signature.bind(*arguments)
    except TypeError as error:
        hint = (
            "pass the batch too, after the parameters"
            if batch is None
            else "the batch is one argument (any pytree): for a loss_fn(params, x, y) pass "
            "`lambda params, batch: loss_fn(params, *batch)` with the batch (x, y)"
        )
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(f"{where} calls {call}, which {name}{signature} cannot take ({error}): {hint}") from None
    return call


def differentiable_loss(loss_on: Callable, traced: list, where: str) -> Callable:
    """The loss as eosflow differentiates it, from one trace of it (:func:`eosflow.tracing.equations`):
    in reverse mode only if it calls a ``jax.custom_vjp`` function (forward mode cannot enter it;
    :func:`eosflow.derivative_chain.forward_differentiable`), with a warning, naming ``where``, if it
    computes in half precision (:func:`eosflow.precision.warn_half_precision`)."""
    warn_half_precision(traced, where)
    return forward_differentiable(loss_on, traced)


def chunked_mean(loss_on: Callable[[Array, PyTree], Array], w: Array, data: PyTree, size: int) -> Array:
    """(1/N) sum_c n_c loss_on(w, chunk_c) over consecutive chunks of ``size`` examples (the last may be
    shorter): the mean loss when ``loss_on`` is a mean over examples. The full chunks run in a
    ``lax.map`` under ``jax.checkpoint``, so reverse mode keeps one chunk's activations at a time."""
    n = example_count(data, "microbatch")
    if n <= size:
        return loss_on(w, data)
    full, rest = divmod(n, size)
    chunks = jax.tree_util.tree_map(lambda leaf: leaf[: full * size].reshape(full, size, *leaf.shape[1:]), data)
    body = jax.checkpoint(lambda w, chunk: loss_on(w, chunk))
    total = size * jnp.sum(jax.lax.map(lambda chunk: body(w, chunk), chunks))
    if rest:
        total = total + rest * body(w, jax.tree_util.tree_map(lambda leaf: leaf[full * size :], data))
    return total / n


def example_count(data: PyTree, where: str) -> int:
    """N, the length of the first axis the leaves of a batch share (its examples); a SpecError naming each leaf
    whose first axis is another length, or that has none (a scalar, per-class weights): chunks of examples
    would slice it too, and the loss of a chunk would read the wrong part of it."""
    leaves = [
        (jax.tree_util.keystr(path), np.shape(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]
    ]
    if not leaves:
        raise SpecError(f"{where}: the batch holds no arrays, so it has no examples to split")
    lengths = collections.Counter(shape[0] for _, shape in leaves if shape)
    if not lengths:
        raise SpecError(f"{where}: no leaf of the batch has an axis of examples (all are scalars)")
    n = lengths.most_common(1)[0][0]
    odd = [f"batch{name} of shape {shape}" for name, shape in leaves if not shape or shape[0] != n]
    if odd:
        example = next(f"batch{name} of shape {shape}" for name, shape in leaves if shape and shape[0] == n)
        raise SpecError(
            f"{where} splits every leaf of the batch along its first axis, the examples ({example}: {n}), but "
            f"{', '.join(odd)} {'has' if len(odd) == 1 else 'have'} no axis of {n} there: keep per-class weights "
            "and other constants out of the batch (in loss_fn's closure)"
        )
    return int(n)


def check_example_count(size: Any, where: str) -> None:
    """A SpecError unless ``size`` (a microbatch) is a number of examples >= 1 or None."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise SpecError(
            f"{where} must be a number of examples >= 1 (or None: the whole batch at once; 0 in a spec), got {size!r}"
        )


def check_mean_over_examples(loss_of: Callable[[int, int], float], count: int, size: int, where: str) -> None:
    """A SpecError unless, in every chunk of ``size`` consecutive examples of the ``count`` (the split a microbatch
    of ``size`` makes; pairs for size 1), the chunk's loss equals the row-weighted mean of its two halves' losses
    to 1e-5 relative (``loss_of(a, b)``: the loss of examples a..b-1). Averaging chunks needs a loss that is a mean
    over examples: a summed loss, BatchNorm's batch statistics, or a mean over unmasked entries (ignored labels,
    padding) whose chunks hold different numbers of them fail this."""
    width = max(size, 2)
    for a in range(0, count - 1, width):
        b = min(a + width, count)
        if b - a < 2:
            continue
        h = a + (b - a) // 2
        whole, first, second = loss_of(a, b), loss_of(a, h), loss_of(h, b)
        mean = ((h - a) * first + (b - h) * second) / (b - a)
        if not abs(whole - mean) <= 1e-5 * abs(whole) + 1e-30:
            raise SpecError(
                f"{where}: the loss is not a mean over examples, so chunks cannot be averaged: the loss of examples "
                f"{a}-{b - 1} is {whole:.8g}, the row-weighted mean of the losses of {a}-{h - 1} and {h}-{b - 1} "
                f"{mean:.8g} (a loss summed over examples, BatchNorm normalizing by the batch's statistics, or a "
                "mean over unmasked entries, such as labels ignored by cross-entropy, depends on how the batch is cut)"
            )


def ravel(params: PyTree, where: str = "params", on_device: bool = False) -> tuple[Array, Unravel]:
    """Flatten a pytree of arrays into one vector (in the common dtype), with its inverse.

    Every leaf is a parameter, so it must be a real floating-point array; anything else (a step
    counter, a flag, a Python scalar, an Equinox module's function) is a SpecError naming the leaf
    as ``where`` + its path. Concrete leaves are joined in NumPy, so float64 leaves stay float64
    where JAX's x64 mode is off (jnp would round them to float32 here, before a run's scoped float64
    could see them); traced leaves (under jit), and every leaf with ``on_device``, are joined in jnp
    (no copy through the host for arrays on a GPU).
    """
    unravel = layout(params, where)
    leaves = jax.tree.leaves(params)
    flat: Any  # a jax.Array for traced leaves, a NumPy array (an ArrayLike every jnp op takes) otherwise
    if on_device or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        flat = jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves]) if leaves else jnp.zeros(0, dtype)
    else:
        arrays = [np.asarray(leaf) for leaf in leaves]
        dtype = np.result_type(*arrays) if arrays else np.dtype("float32")
        flat = np.concatenate([a.ravel().astype(dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return flat, unravel


def layout(params: PyTree, where: str = "params") -> Unravel:
    """:func:`ravel`'s inverse for ``params``, its leaves checked as parameters, without joining them: their shapes
    and dtypes alone (nothing copied)."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in with_paths:
        _check_parameter(f"{where}{jax.tree_util.keystr(path)}", leaf)
    leaves = [leaf for _, leaf in with_paths]
    return Unravel(treedef, tuple(leaf.shape for leaf in leaves), tuple(np.dtype(leaf.dtype).name for leaf in leaves))


def differentiable_part(params: PyTree, wrt: Any = None) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """What a module's own gradient differentiates, and the map that puts it back beside the rest, held fixed:
    an Equinox module's floating arrays (``eqx.filter_grad``; functions, integer buffers fixed) or a Flax NNX
    module's ``nnx.Param`` variables (``nnx.grad``; BatchNorm statistics, RNG state, counters fixed). Any
    other pytree is all parameters (each leaf checked by :func:`ravel`).

    ``wrt`` measures another part, as the framework's own optimizer is told to train it: for an NNX module a
    filter as ``nnx.split`` and ``nnx.Optimizer(..., wrt=)`` take (``nnx.LoRAParam``, ``nnx.All(nnx.Param,
    nnx.PathContains("head"))``); for an Equinox module or any other pytree a filter spec as
    ``eqx.partition`` takes (a callable on leaves, or a pytree prefix of bools). A ValueError if it selects
    no array."""
    nnx = sys.modules.get("flax.nnx")  # eosflow never imports flax: a module of the user's means it is loaded
    if nnx is not None and isinstance(params, nnx.Module):
        graphdef, measured, rest = nnx.split(params, nnx.Param if wrt is None else wrt, ...)
        _check_selected(measured, wrt)
        # Fresh variables at every rebuild: what the forward writes (BatchNorm's running statistics, RNG
        # counts) lands on copies, in the trace that made them, never on the user's module.
        return measured, lambda part: nnx.merge(graphdef, part, jax.tree.map(lambda leaf: leaf, rest))
    if isinstance(params, eqx.Module) or wrt is not None:
        try:
            arrays, rest = eqx.partition(params, eqx.is_inexact_array if wrt is None else wrt)
        except ValueError as error:  # JAX's structure error names neither wrt nor what a filter spec is
            raise ValueError(
                f"wrt = {wrt!r} is not a filter spec of the parameters: as for eqx.partition, a callable on leaves "
                "or a pytree of bools shaped like them (a bool for every entry, or for a whole sub-tree); "
                f"{error}"
            ) from None
        _check_selected(arrays, wrt)
        return arrays, lambda part: eqx.combine(part, rest)
    return params, _identity


def _check_selected(part: PyTree, wrt: Any) -> None:
    if wrt is not None and not jax.tree.leaves(part):
        raise ValueError(f"wrt = {wrt!r} selects no array of the parameters: nothing to measure")


def _nnx_layers(params: PyTree, selects: Callable[[Any, Any], bool]) -> list[str]:
    """The paths (``model.drop``, ``model.layers[2]``) of the layers of a Flax NNX module for which
    ``selects(nnx, layer)`` holds; none for anything else."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(params, nnx.Module):
        return []
    return [
        "model" + "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path)
        for path, layer in nnx.iter_modules(params)
        if selects(nnx, layer)
    ]


def training_dropouts(params: PyTree) -> list[str]:
    """The Flax NNX Dropout layers in ``params`` left in training mode (rate > 0, ``deterministic`` False): with
    the module's RNG state held fixed each draws one mask, the same at every evaluation (unless the forward
    passes ``deterministic=True`` itself)."""
    return _nnx_layers(
        params, lambda nnx, layer: isinstance(layer, nnx.Dropout) and layer.rate > 0 and not layer.deterministic
    )


def training_batch_norms(params: PyTree) -> list[str]:
    """The Flax NNX BatchNorm layers in ``params`` in training mode (``use_running_average`` False): they
    normalize by the batch's statistics."""
    return _nnx_layers(params, lambda nnx, layer: isinstance(layer, nnx.BatchNorm) and not layer.use_running_average)


def one_example_batch_statistics(layers: list[str], mode: str, remedy: str) -> ValueError:
    """The error for BatchNorm ``layers`` in training ``mode`` asked for a batch of one example, whose own
    statistics are no batch's (per-example gradients, batch_size = 1); ``remedy`` names the running statistics'
    switch of the model's library."""
    return ValueError(
        f"the model's BatchNorm layers in {mode} ({', '.join(layers)}) normalize by the batch's statistics, which "
        "a batch of one example does not have: per-example gradients (the Langevin model's noise, "
        "sgd.noise_every, the SGD noise report) and batch_size = 1 are not defined for them. Minibatch SGD with "
        f"batch_size >= 2 is (each minibatch uses its own statistics); or {remedy} to use the running statistics"
    )


class OnDifferentiablePart(eqx.Module):
    """``fn(rebuild(part), *args)``: a function of a module, as a function of what :func:`differentiable_part`
    measures; with ``batch_statistics`` (the paths of BatchNorm layers in training mode) a first argument of
    one example (rows) is refused (:func:`one_example_batch_statistics`)."""

    fn: Callable = eqx.field(static=True)
    rebuild: Callable = eqx.field(static=True)
    batch_statistics: tuple[str, ...] = eqx.field(static=True, default=())

    def __call__(self, part: PyTree, *args: Any) -> Any:
        if self.batch_statistics and args and jax.tree_util.tree_leaves(args[0])[0].shape[0] == 1:
            raise one_example_batch_statistics(
                list(self.batch_statistics), "training mode", "call model.eval() (use_running_average=True)"
            )
        return self.fn(self.rebuild(part), *args)


def _check_parameter(name: str, leaf: Any) -> None:
    """A SpecError unless ``leaf`` is a real floating-point array (what a parameter can be)."""
    if isinstance(leaf, int | float | complex):
        raise SpecError(
            f"{name} is a Python {type(leaf).__name__}, not an array: make it an array of the run's dtype, "
            f'e.g. `jnp.asarray({leaf!r}, "float32")`'
        )
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise SpecError(
            f"{name} is a {type(leaf).__name__}, not an array: pass only the arrays to differentiate (for an "
            "Equinox module: `params, static = eqx.partition(model, eqx.is_inexact_array)`, and rebuild it "
            "with eqx.combine in the loss)"
        )
    dtype = jnp.dtype(leaf.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise SpecError(f"{name} is {dtype.name}: eosflow's parameters are real floating-point arrays")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise SpecError(
            f"{name} is {dtype.name}, and only floating-point leaves can be parameters (every leaf is "
            "differentiated and stepped): keep counters and other constants out of the parameters (in "
            "the model's closure, or `eqx.partition(model, eqx.is_inexact_array)` for an Equinox module; a "
            "Flax NNX module itself is measured over its nnx.Param variables)"
        )


class Unravel(eqx.Module):
    """The inverse of :func:`ravel`, hashable by value (so rebuilt objectives reuse compilations)."""

    treedef: Any = eqx.field(static=True)
    shapes: tuple = eqx.field(static=True)
    dtypes: tuple = eqx.field(static=True)

    @property
    def size(self) -> int:
        """The flat vector's length: every leaf's entries."""
        return sum(int(np.prod(shape)) for shape in self.shapes)

    def __call__(self, w: Array) -> PyTree:
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        pieces = jnp.split(w, np.cumsum(sizes)[:-1]) if sizes else []
        leaves = [p.reshape(shape).astype(dtype) for p, shape, dtype in zip(pieces, self.shapes, self.dtypes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class ModelLoss(eqx.Module):
    """loss(model(unravel(w), x), y): hashable by value so equal objectives share compilations."""

    model: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    loss: Callable = eqx.field(static=True)

    def __call__(self, w: Array, batch: PyTree) -> Array:
        inputs, targets = batch
        return self.loss(self.model(self.unravel(w), inputs), targets)


class _ignore_batch(eqx.Module):
    fn: Callable

    def __call__(self, w: Array, batch: PyTree) -> Array:
        return self.fn(w)


def _identity(w: Array) -> Array:
    return w
