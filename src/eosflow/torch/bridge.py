"""A torch objective as a JAX function, so every eosflow process runs on a torch model.

``jax_loss(objective)`` is a JAX function L(w) of a flat vector whose value and derivatives are
computed by torch (``jax.pure_callback``), chained by ``jax.custom_jvp`` rules:

    L(w)            tangent  <g(w), dw>                     (g from one torch grad-and-value pass)
    (L, g)(w)       tangent  (<g, dw>, H(w) dw)
    H(w) v          tangent  D^3 L[dw, v, .] + H(w) dv       (symbolic zeros skip unneeded terms)
    D^3 L[u, v, .]  no tangent (a fourth derivative raises)

so JAX's own ``grad``, ``jvp``, ``linearize`` and ``vmap`` of L (used by ``eosflow.Objective``,
the eigensolver and every flow) call exactly one torch derivative each. On the CPU the arrays
cross without copies (NumPy views); on a GPU each call is a device-host round trip, which is why
the live tracker (:mod:`eosflow.torch.tracker`) batches its products into one call per iteration.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.custom_derivatives import SymbolicZero
from torch.func import vmap

from eosflow.objective import Objective
from eosflow.problems.registry import Problem
from eosflow.torch.objective import Batch, TorchObjective


def _to_torch(array: np.ndarray, objective: TorchObjective) -> torch.Tensor:
    return torch.from_numpy(np.require(array, requirements="W")).to(objective.device)


def _batched(fn: Callable[..., torch.Tensor], objective: TorchObjective) -> Callable[..., np.ndarray]:
    """A NumPy callback of ``fn(*vectors)`` (each (d,)) that also accepts leading batch axes.

    Under ``jax.vmap`` (``vmap_method="expand_dims"``) unbatched arguments arrive with leading axes
    of size 1 and batched ones with the batch axes in front; torch.func.vmap maps over the latter.
    """

    def callback(*arrays: np.ndarray) -> np.ndarray:
        lead = np.broadcast_shapes(*(a.shape[:-1] for a in arrays))
        tensors = [_to_torch(a, objective) for a in arrays]
        if math.prod(lead) == 1:  # nothing to map over (possibly a batch of one)
            out = fn(*(t.reshape(t.shape[-1]) for t in tensors))
            return out.detach().cpu().numpy().reshape(tuple(lead) + tuple(out.shape))
        flat: list[torch.Tensor] = []
        in_dims: list[int | None] = []
        for t in tensors:
            if math.prod(t.shape[:-1]) == 1:
                flat.append(t.reshape(t.shape[-1]))
                in_dims.append(None)
            else:
                flat.append(torch.broadcast_to(t, (*lead, t.shape[-1])).reshape(-1, t.shape[-1]))
                in_dims.append(0)
        out = vmap(fn, in_dims=tuple(in_dims))(*flat)
        return out.detach().cpu().numpy().reshape(tuple(lead) + tuple(out.shape[1:]))

    return callback


_TORCH_LOCK = threading.Lock()  # one torch evaluation at a time (see host_callback)


def host_callback(
    fn: Callable[..., np.ndarray], shape: tuple[int, ...], dtype: np.dtype, *args: jax.Array, vmap_method: str
) -> jax.Array:
    """``jax.pure_callback(fn, (shape, dtype), *args)``, with the arrays carried as raw 32-bit words.

    Under a scoped ``jax.enable_x64`` (how an eosflow run sets its precision), XLA may run a
    callback on one of its own threads, where the thread-local flag is off, and JAX's callback
    machinery then casts float64 arguments to float32 before ``fn`` sees them (and refuses a
    float64 result). Bit-casting to uint32 and back on each side keeps every bit; it costs a view.

    XLA runs independent callbacks of one computation concurrently on its own threads (e.g. a step's
    gradient and Hessian-vector products), and torch cannot evaluate one module in two threads at
    once: ``torch.func.functional_call`` swaps the module's parameters for the call, so one thread's
    forward saw the other's (a functorch "INTERNAL ASSERT FAILED ... escaped?"). Every torch callback
    therefore holds one process-wide lock.
    """
    per_word = np.dtype(dtype).itemsize // 4
    words = lambda a: a.reshape(-1).view(np.uint32).reshape(a.shape + ((per_word,) if per_word > 1 else ()))  # noqa: E731

    def on_words(*packed: np.ndarray) -> np.ndarray:
        arrays = [
            np.ascontiguousarray(p).view(dtype).reshape(p.shape[:-1] if per_word > 1 else p.shape) for p in packed
        ]
        with _TORCH_LOCK:
            out = np.asarray(fn(*arrays), dtype=dtype, order="C")
        return words(out)  # (ascontiguousarray above makes 0-d arrays 1-d)

    packed = [jax.lax.bitcast_convert_type(a, jnp.uint32) for a in args]
    result = jax.ShapeDtypeStruct(tuple(shape) + ((per_word,) if per_word > 1 else ()), jnp.uint32)
    out = jax.pure_callback(on_words, result, *packed, vmap_method=vmap_method)
    return jax.lax.bitcast_convert_type(out, dtype)


def jax_loss(objective: TorchObjective) -> Callable[[jax.Array], jax.Array]:
    """L(w) as a JAX function of a flat vector (d,), differentiable to third order by torch."""
    d, dtype = objective.dim, np.dtype(str(objective.dtype).removeprefix("torch."))

    def call(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], *args):
        """fn's value at traced args; result structs are made here, where the precision is known."""
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:  # checked where traced: precision may be scoped
            raise ValueError(
                f"the torch model is {dtype.name} but JAX computes in float32 here: run with dtype = "
                f'"float64" (eosflow.simulate does), inside `jax.enable_x64()`, or cast the model with .float()'
            )
        return host_callback(_batched(fn, objective), shape, dtype, *args, vmap_method="expand_dims")

    def both(w: torch.Tensor) -> torch.Tensor:
        value, g = objective.value_and_grad(w)  # one torch pass, one callback: (L, g) as (d + 1,)
        return torch.cat([value.reshape(1), g])

    def is_zero(tangent) -> bool:
        return isinstance(tangent, SymbolicZero)

    @jax.custom_jvp
    def value_and_grad(w):
        out = call(both, (d + 1,), w)
        return out[0], out[1:]

    def _value_and_grad_jvp(primals, tangents):
        (w,), (dw,) = primals, tangents
        value, g = value_and_grad(w)
        if is_zero(dw):
            return (value, g), (jnp.zeros_like(value), jnp.zeros_like(g))
        return (value, g), (jnp.vdot(g, dw), hvp(w, dw))

    value_and_grad.defjvp(_value_and_grad_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def loss(w):
        return call(objective.value, (), w)

    def _loss_jvp(primals, tangents):
        (w,), (dw,) = primals, tangents
        value, g = value_and_grad(w)
        return value, jnp.zeros_like(value) if is_zero(dw) else jnp.vdot(g, dw)

    loss.defjvp(_loss_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def hvp(w, v):
        return call(objective.hvp, (d,), w, v)

    def _hvp_jvp(primals, tangents):
        (w, v), (dw, dv) = primals, tangents
        terms = []
        if not is_zero(dw):
            terms.append(third_derivative(w, dw, v))
        if not is_zero(dv):
            terms.append(hvp(w, dv))
        tangent = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(w)
        return hvp(w, v), tangent

    hvp.defjvp(_hvp_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def third_derivative(w, u, v):
        return call(objective.third_derivative, (d,), w, u, v)

    @third_derivative.defjvp
    def _fourth(primals, tangents):
        raise NotImplementedError("fourth derivatives of a torch objective are not available")

    return loss


def to_jax(objective: TorchObjective) -> tuple[Objective, np.ndarray]:
    """An :class:`eosflow.Objective` backed by torch, with the module's current parameters as w0
    (a NumPy array in the model's dtype: a run chooses its precision from it)."""
    return Objective.from_function(jax_loss(objective)), objective.flat_parameters().cpu().numpy()


def problem(model: torch.nn.Module, loss_fn: Callable, batch: Batch) -> Problem:
    """An eosflow problem of a torch model (for :func:`eosflow.simulate`): L over the model's
    parameters on ``batch``, from the model's current weights, in its current train/eval modes
    (``info["norm_layers"]`` records which statistics BatchNorm used). Every process runs on it."""
    objective = TorchObjective(model, loss_fn, batch)
    objective.check()
    bridged, w0 = to_jax(objective)
    info = {"model": type(model).__name__, "parameters": objective.dim, "backend": f"torch {torch.__version__}"}
    norm_layers = objective.norm_layers()
    if norm_layers is not None:
        info["norm_layers"] = norm_layers
    return Problem(objective=bridged, w0=w0, info=info)
