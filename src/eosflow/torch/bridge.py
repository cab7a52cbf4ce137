"""A torch objective as a JAX function, so every eosflow process runs on a torch model.

``jax_loss(objective)`` is a JAX function L(w) of a flat vector whose value and derivatives are
computed by torch (``jax.pure_callback``), chained by ``jax.custom_jvp`` rules (:mod:`eosflow.derivative_chain`):

    L(w)            tangent  <g(w), dw>                     (g from one torch grad-and-value pass)
    (L, g)(w)       tangent  (<g, dw>, H(w) dw)
    H(w) v          tangent  D^3 L[dw, v, .] + H(w) dv       (symbolic zeros skip unneeded terms)
    D^3 L[u, v, .]  no tangent (a fourth derivative raises)

so JAX's own ``grad``, ``jvp``, ``linearize`` and ``vmap`` of L (used by ``eosflow.Objective``,
the eigensolver and every flow) call exactly one torch derivative each. Each call copies its
arguments into torch (JAX hands a callback read-only arrays) and its result back into JAX; on a GPU
it is also a device-host round trip. ``benchmarks/torch_bridge.py --crossing`` measures the copies
against DLPack's zero-copy views (docs/torch.md, "How it works"). Hessian-vector products at a repeated w
on the full batch (an eigensolve's columns) share one gradient graph (:class:`SharedGraph`).

``jax_loss_on(objective)`` is the same chain for ``loss_on(w, indices)``, the loss on the examples
``indices`` (slices of the batch along its example axes, by default its rows; integers, carried to
every callback with a symbolic-zero tangent):
``to_jax`` builds the Objective on it whose data are the indices 0..N-1, so SGD's minibatches and
the per-example gradients of the noise models are torch evaluations too.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from eosflow.derivative_chain import derivative_chain
from eosflow.objective import Objective, _identity
from eosflow.problems.registry import Problem
from eosflow.torch.objective import Batch, ExampleAxis, LinearizedHessian, TorchObjective, numpy_dtype, train_modes


def _to_torch(array: np.ndarray, objective: TorchObjective) -> torch.Tensor:
    return torch.from_numpy(np.require(array, requirements="W")).to(objective.device)


def _batched(
    fn: Callable[..., torch.Tensor],
    what: str,
    objective: TorchObjective,
    indexed: bool,
    single: Callable[..., torch.Tensor] | None = None,
) -> Callable[..., np.ndarray]:
    """A NumPy callback of ``fn(*vectors, batch)`` (each vector (d,)) that also accepts leading batch axes;
    ``what`` names fn's results (``"gradients"``) for the warning of :meth:`TorchObjective.map_lanes`;
    ``single`` (default fn) serves a call without leading axes, outside ``torch.func.vmap``.

    With ``indexed`` the last array holds example indices (..., S): the minibatch is
    ``objective.examples`` of them (the stored batch itself for 0, ..., N-1), else it is the full
    batch. Under ``jax.vmap`` (``vmap_method="expand_dims"``) unbatched arguments arrive with leading
    axes of size 1 and batched ones with the batch axes in front; torch.func.vmap maps over the
    latter, and over the examples of the minibatches (along their example axes) when the indices are
    batched (per-example gradients: one example per lane, its example axis kept with size 1).
    """

    def callback(*arrays: np.ndarray) -> np.ndarray:
        vectors, indices = (arrays[:-1], arrays[-1]) if indexed else (arrays, None)
        lead = np.broadcast_shapes(*(a.shape[:-1] for a in arrays))
        tensors = [_to_torch(a, objective) for a in vectors]
        lanes: tuple = ()  # the batched minibatches, one per lane (a vmapped argument of fn)
        batch = objective.batch
        if indices is not None:
            objective.check_minibatch(indices.shape[-1])  # (the modes may have changed since tracing)
            if math.prod(indices.shape[:-1]) == 1:  # one minibatch for every lane
                batch = objective.examples(indices.reshape(-1))
            else:
                rows = np.broadcast_to(indices, (*lead, indices.shape[-1])).reshape(-1, indices.shape[-1])
                lanes = (objective.examples(rows),)
        call = fn if lanes else lambda *v: fn(*v, batch)
        if math.prod(lead) == 1:  # nothing to map over (possibly a batch of one)
            out = (single or fn)(*(t.reshape(t.shape[-1]) for t in tensors), batch)  # (no lanes: lead is all 1)
            return out.detach().cpu().numpy().reshape(tuple(lead) + tuple(out.shape))
        flat: list = []  # tensors, and minibatches (pytrees of tensors)
        in_dims: list = []
        for t in tensors:
            if math.prod(t.shape[:-1]) == 1:
                flat.append(t.reshape(t.shape[-1]))
                in_dims.append(None)
            else:
                flat.append(torch.broadcast_to(t, (*lead, t.shape[-1])).reshape(-1, t.shape[-1]))
                in_dims.append(0)
        for batch in lanes:
            flat.append(batch)  # (a pytree of tensors, mapped over their example axes)
            in_dims.append(objective.example_dims())
        lanes_are = f"per-example {what}" if lanes else f"{what} for a block of {math.prod(lead)} vectors"
        out = objective.map_lanes(call, tuple(in_dims), flat, math.prod(lead), lanes_are)
        return out.detach().cpu().numpy().reshape(tuple(lead) + tuple(out.shape[1:]))

    return callback


_TORCH_LOCK = threading.Lock()  # one torch evaluation at a time (see host_callback)


def _words(dtype: np.dtype) -> int:
    """32-bit words per element of ``dtype`` (a trailing axis of that length when more than one)."""
    return max(np.dtype(dtype).itemsize // 4, 1)


def host_callback(
    fn: Callable[..., np.ndarray], shape: tuple[int, ...], dtype: np.dtype, *args: jax.Array, vmap_method: str
) -> jax.Array:
    """``jax.pure_callback(fn, (shape, dtype), *args)``, with the arrays carried as raw 32-bit words.

    Under a scoped ``jax.enable_x64`` (how an eosflow run sets its precision), XLA may run a
    callback on one of its own threads, where the thread-local flag is off, and JAX's callback
    machinery then casts float64 arguments to float32 before ``fn`` sees them (and refuses a
    float64 result). Bit-casting to uint32 and back on each side keeps every bit; it costs a view.
    Each argument keeps its own dtype (32- or 64-bit: float vectors, int32 example indices).

    XLA runs independent callbacks of one computation concurrently on its own threads (e.g. a step's
    gradient and Hessian-vector products), and torch cannot evaluate one module in two threads at
    once: ``torch.func.functional_call`` swaps the module's parameters for the call, so one thread's
    forward saw the other's (a functorch "INTERNAL ASSERT FAILED ... escaped?"). Every torch callback
    therefore holds one process-wide lock.
    """
    arg_dtypes = [np.dtype(a.dtype) for a in args]

    def words(a: np.ndarray) -> np.ndarray:
        per_word = _words(a.dtype)
        return a.reshape(-1).view(np.uint32).reshape(a.shape + ((per_word,) if per_word > 1 else ()))

    def on_words(*packed: np.ndarray) -> np.ndarray:
        arrays = [
            np.ascontiguousarray(p).view(t).reshape(p.shape[:-1] if _words(t) > 1 else p.shape)
            for p, t in zip(packed, arg_dtypes)
        ]
        with _TORCH_LOCK:
            out = np.asarray(fn(*arrays), dtype=dtype, order="C")
        return words(out)  # (ascontiguousarray above makes 0-d arrays 1-d)

    packed = [jax.lax.bitcast_convert_type(a, jnp.uint32) for a in args]
    per_word = _words(dtype)
    result = jax.ShapeDtypeStruct(tuple(shape) + ((per_word,) if per_word > 1 else ()), jnp.uint32)
    out = jax.pure_callback(on_words, result, *packed, vmap_method=vmap_method)
    return jax.lax.bitcast_convert_type(out, dtype)


def jax_loss(objective: TorchObjective) -> Callable[[jax.Array], jax.Array]:
    """L(w) as a JAX function of a flat vector (d,) on the full batch, differentiable to third order by torch."""
    loss_on = _bridge(objective)
    return lambda w: loss_on(w, None)


def jax_loss_on(objective: TorchObjective) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``loss_on(w, indices)``: the mean loss of w on the examples ``indices`` (integers, shape (S,);
    the batch's rows), as a JAX function differentiable to third order in w by torch. ``indices``
    0, ..., N-1 in order evaluate the stored full batch, exactly as :func:`jax_loss`."""
    loss_on = _bridge(objective)

    def on_examples(w: jax.Array, indices: jax.Array) -> jax.Array:
        indices = jnp.asarray(indices)
        if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(
                f"indices must be a vector of example indices (S,), got {indices.dtype} of shape {indices.shape}"
            )
        return loss_on(w, indices.astype(jnp.int32))

    return on_examples


def _bridge(objective: TorchObjective) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
    """loss(w, indices) with its chain of custom_jvp rules (:func:`eosflow.derivative_chain.derivative_chain`);
    ``indices`` None is the full batch.

    The indices are integers, so JAX gives them a symbolic-zero (float0) tangent: they pass through
    to every derivative's callback unchanged.
    """
    d, dtype = objective.dim, numpy_dtype(objective.dtype)
    shared = SharedGraph(objective)

    def call(fn: Callable[..., torch.Tensor], what: str, shape: tuple[int, ...], *args, indices, single=None):
        """fn's value at traced args (``what`` names its results; ``single`` serves a call without lanes, as
        :func:`_batched`); result structs are made here, where the precision is known."""
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:  # checked where traced: precision may be scoped
            raise ValueError(
                f"the torch model is {dtype.name} but JAX computes in float32 here: run with dtype = "
                f'"float64" (eosflow.simulate does), inside `jax.enable_x64()`, or cast the model with .float()'
            )
        if indices is None:
            callback = _batched(fn, what, objective, False, single)
            return host_callback(callback, shape, dtype, *args, vmap_method="expand_dims")
        objective.check_minibatch(indices.shape[-1])  # a clear error where traced (and again on the host)
        callback = _batched(fn, what, objective, True, single)
        return host_callback(callback, shape, dtype, *args, indices, vmap_method="expand_dims")

    def both(w: torch.Tensor, batch) -> torch.Tensor:
        value, g = objective.value_and_grad(w, batch)  # one torch pass, one callback: (L, g) as (d + 1,)
        return torch.cat([value.reshape(1), g])

    def value_and_grad(w, indices):
        out = call(both, "gradients", (d + 1,), w, indices=indices)
        return out[0], out[1:]

    return derivative_chain(
        value=lambda w, indices: call(objective.value, "losses", (), w, indices=indices),
        value_and_grad=value_and_grad,
        hvp=lambda w, v, indices: call(
            objective.hvp, "Hessian-vector products", (d,), w, v, indices=indices, single=shared
        ),
        third_derivative=lambda w, u, v, indices: call(
            objective.third_derivative, "third derivatives", (d,), w, u, v, indices=indices
        ),
        source="a torch objective",
    )


class SharedGraph:
    """H(w) v through one gradient graph (:class:`LinearizedHessian`) while w repeats on the full batch: the
    products of an eigensolve (LOBPCG's columns, each one callback) are all at one w, and share the graph of
    the first, as the tracker's do, where each product from scratch evaluates the forward and the gradient
    again. A new w, other train/eval modes or an in-place change of any of the model's tensors (their version
    counters: a frozen layer, a buffer) builds it again; a minibatch is evaluated from scratch. The graph (the
    batch's activations) is held until then."""

    def __init__(self, objective: TorchObjective):
        self.objective = objective
        self.key: tuple | None = None
        self.hessian: LinearizedHessian | None = None

    def __call__(self, w: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        objective = self.objective
        if batch is not objective.batch:
            return objective.hvp(w, v, batch)
        model = objective.model
        state = (train_modes(model), tuple(t._version for t in itertools.chain(model.parameters(), model.buffers())))
        if self.hessian is None or self.key is None or self.key[1] != state or not torch.equal(self.key[0], w):
            self.hessian = None  # (the old graph freed before the new one is built)
            self.hessian = objective.linearized(w, batch)
            self.key = (w.clone(), state)
        return self.hessian(v[:, None])[:, 0]


class _ExampleLoss(eqx.Module):
    """loss_on(w, indices) of an Objective whose data are the example indices 0, ..., N-1."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, w: jax.Array, indices: jax.Array) -> jax.Array:
        return self.fn(w, indices)


def to_jax(objective: TorchObjective) -> tuple[Objective, np.ndarray]:
    """An :class:`eosflow.Objective` backed by torch, with the module's current parameters as w0
    (a NumPy array in the model's dtype: a run chooses its precision from it).

    Its data are the example indices ``arange(N)`` (int32), N the batch's size along its example axes
    (by default the shared leading one; ``objective.example_axis``), and ``loss_on(w, indices)`` the
    loss on those examples of the batch, so minibatches (SGD), per-example gradients (the Langevin
    model's noise) and the full batch (the indices in order, the stored batch itself) are all evaluated
    by torch. A batch without examples (by default: tensors that share no leading axis) gives the
    objective L(w) alone, as ``Objective.from_function``.
    """
    w0 = objective.flat_parameters().cpu().numpy()
    n = objective.num_examples
    if n is None:
        return Objective.from_function(jax_loss(objective)), w0
    examples = jnp.arange(n, dtype=jnp.int32)
    return Objective(loss_on=_ExampleLoss(jax_loss_on(objective)), data=examples, unravel=_identity), w0


def problem(model: torch.nn.Module, loss_fn: Callable, batch: Batch, example_axis: ExampleAxis = None) -> Problem:
    """An eosflow problem of a torch model (for :func:`eosflow.simulate`): L over the model's
    parameters on ``batch``, from the model's current weights, in its current train/eval modes
    (``info["norm_layers"]`` records which statistics BatchNorm used). Every process runs on it.

    The examples minibatches are drawn from are the slices of the batch's tensors along
    ``example_axis``: by default their shared leading axis; an int for every tensor, or a pytree of
    ints matching the batch, e.g. ``(1, 0)`` for an ``nn.LSTM`` input (T, N, F) with targets (N,)
    (``info["example_axes"]`` then lists each tensor's axis)."""
    objective = TorchObjective(model, loss_fn, batch, example_axis)
    objective.check()
    bridged, w0 = to_jax(objective)
    info = {"model": type(model).__name__, "parameters": objective.dim, "backend": f"torch {torch.__version__}"}
    if objective.num_examples is not None:
        info["n_train"] = objective.num_examples
    if example_axis is not None:
        info["example_axes"] = [axis for axis in objective.axes if axis is not None]
    norm_layers = objective.norm_layers()
    if norm_layers is not None:
        info["norm_layers"] = norm_layers
    return Problem(objective=bridged, w0=w0, info=info)
