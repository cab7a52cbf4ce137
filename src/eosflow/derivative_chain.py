"""A loss whose derivatives in w come from given functions, chained by ``jax.custom_jvp`` rules.

    L(w, b)           tangent  <g, dw>
    (L, g)(w, b)      tangent  (<g, dw>, H dw)
    H(w, b) v         tangent  D^3 L[dw, v, .] + H dv      (symbolic zeros skip unneeded terms)
    D^3 L[u, v, .]    no tangent (a fourth derivative raises)

so JAX's ``grad``, ``jvp``, ``linearize`` and ``vmap`` of the chained loss (what
:class:`eosflow.Objective`, the eigensolver and every flow use) call exactly one given function per
derivative. The batch b is carried to every function unchanged; eosflow differentiates in w only.

Two users: the torch bridge (each function a torch evaluation, :mod:`eosflow.torch.bridge`), and
:func:`forward_differentiable`, for a JAX loss that holds a ``jax.custom_vjp`` function. JAX cannot
take forward-mode derivatives of such a function, so the usual forward-over-reverse HVP fails
(inside ``jit``, only when lowered). Its chain is built from reverse mode alone:

    H v = grad_w <g(w), v>,        D^3 L[u, v, .] = grad_w <u, H(w) v>,

which differentiate the user's backward rule, as forward-over-reverse would if JAX allowed it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import JaxprEqn

from eosflow.tracing import array_leaves

PyTree = Any


def derivative_chain(
    value: Callable[[jax.Array, PyTree], jax.Array],
    value_and_grad: Callable[[jax.Array, PyTree], tuple[jax.Array, jax.Array]],
    hvp: Callable[[jax.Array, jax.Array, PyTree], jax.Array],
    third_derivative: Callable[[jax.Array, jax.Array, jax.Array, PyTree], jax.Array],
    source: str,
) -> Callable[[jax.Array, PyTree], jax.Array]:
    """``loss(w, batch)`` = ``value(w, batch)``, differentiable to third order in w through the given
    ``value_and_grad(w, b) -> (L, g)``, ``hvp(w, v, b) -> H v`` and ``third_derivative(w, u, v, b)
    -> D^3 L[u, v, .]``; ``source`` names the loss in errors (``"a torch objective"``)."""

    def is_zero(tangent) -> bool:
        return isinstance(tangent, SymbolicZero)

    def constant(batch_tangent) -> None:
        leaves = jax.tree_util.tree_leaves(batch_tangent, is_leaf=is_zero)
        if not all(is_zero(leaf) for leaf in leaves):
            raise NotImplementedError(f"derivatives of {source} are taken in the parameters only, not in its batch")

    @jax.custom_jvp
    def chained_value_and_grad(w, batch):
        return value_and_grad(w, batch)

    def _value_and_grad_jvp(primals, tangents):
        (w, batch), (dw, batch_tangent) = primals, tangents
        constant(batch_tangent)
        loss, g = chained_value_and_grad(w, batch)
        if is_zero(dw):
            return (loss, g), (jnp.zeros_like(loss), jnp.zeros_like(g))
        return (loss, g), (jnp.vdot(g, dw), chained_hvp(w, dw, batch))

    chained_value_and_grad.defjvp(_value_and_grad_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def loss(w, batch):
        return value(w, batch)

    def _loss_jvp(primals, tangents):
        (w, batch), (dw, batch_tangent) = primals, tangents
        constant(batch_tangent)
        loss_value, g = chained_value_and_grad(w, batch)
        return loss_value, jnp.zeros_like(loss_value) if is_zero(dw) else jnp.vdot(g, dw)

    loss.defjvp(_loss_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def chained_hvp(w, v, batch):
        return hvp(w, v, batch)

    def _hvp_jvp(primals, tangents):
        (w, v, batch), (dw, dv, batch_tangent) = primals, tangents
        constant(batch_tangent)
        terms = []
        if not is_zero(dw):
            terms.append(chained_third_derivative(w, dw, v, batch))
        if not is_zero(dv):
            terms.append(chained_hvp(w, dv, batch))
        tangent = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(w)
        return chained_hvp(w, v, batch), tangent

    chained_hvp.defjvp(_hvp_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def chained_third_derivative(w, u, v, batch):
        return third_derivative(w, u, v, batch)

    @chained_third_derivative.defjvp
    def _fourth(primals, tangents):
        raise NotImplementedError(f"fourth derivatives of {source} are not available")

    return loss


class ReverseModeLoss(eqx.Module):
    """``loss_on(w, batch)`` with every derivative taken in reverse mode (:func:`derivative_chain`):
    for a loss holding ``jax.custom_vjp`` functions (``names``), which forward mode cannot enter."""

    loss_on: Callable[[jax.Array, PyTree], jax.Array]
    names: tuple[str, ...] = eqx.field(static=True)

    def __call__(self, w: jax.Array, batch: PyTree) -> jax.Array:
        arrays, with_rest = array_leaves(batch)  # the chain's arguments are traced: a Python int stays closed over

        def loss_on(w, arrays):
            return self.loss_on(w, with_rest(arrays))

        grad = jax.grad(loss_on)

        def hvp(w, v, batch):  # H v = grad_w <g(w), v>
            return jax.grad(lambda x: jnp.vdot(grad(x, batch), v))(w)

        source = "a loss with the custom_vjp function" + ("s " if len(self.names) > 1 else " ") + ", ".join(self.names)

        def third_derivative(w, u, v, batch):  # D^3 L[u, v, .] = grad_w <u, H(w) v>
            try:
                return jax.grad(lambda x: jnp.vdot(u, hvp(x, v, batch)))(w)
            except Exception as error:  # a backward rule JAX cannot differentiate twice (odeint's, in JAX 0.10)
                raise ValueError(
                    f"third derivatives of {source} failed in reverse mode ({type(error).__name__}: "
                    f"{str(error).splitlines()[0]}): the processes that take them (central_flow, projected_flow, "
                    "rmsprop_central_flow) cannot run on this loss; the others and the tracker need only H v, "
                    "which works"
                ) from error

        chain = derivative_chain(loss_on, jax.value_and_grad(loss_on), hvp, third_derivative, source)
        return chain(w, arrays)


def custom_vjp_names(equations: list[JaxprEqn]) -> tuple[str, ...]:
    """The names of the ``jax.custom_vjp`` functions among the equations of a trace
    (:func:`eosflow.tracing.equations`), in order of first call."""
    names = {_function_name(eqn.params): None for eqn in equations if eqn.primitive.name == "custom_vjp_call"}
    return tuple(names)


def forward_differentiable(loss_on: Callable[[jax.Array, PyTree], jax.Array], equations: list[JaxprEqn]) -> Callable:
    """``loss_on`` itself, or wrapped in a :class:`ReverseModeLoss` if its trace (``equations``) calls a
    ``jax.custom_vjp`` function: the wrapped loss has the same value and derivatives, H v taken as
    reverse-over-reverse (about the cost of forward-over-reverse, with more memory)."""
    if isinstance(loss_on, ReverseModeLoss):
        return loss_on
    names = custom_vjp_names(equations)
    return ReverseModeLoss(loss_on, names) if names else loss_on


def _function_name(params: dict) -> str:
    """The name of the function a ``custom_vjp_call`` equation calls (``"swish"``), from its debug info."""
    info = getattr(getattr(params.get("call_jaxpr"), "jaxpr", None), "debug_info", None)
    source = getattr(info, "func_src_info", None) or "custom_vjp"
    return source.split(" at ")[0]
