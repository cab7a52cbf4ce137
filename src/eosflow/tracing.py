"""One trace of a user's function (nothing computed): every operation it would run, sub-computations included.

eosflow reads it where a user's loss enters, for what the loss's shapes do not tell: the
``jax.custom_vjp`` functions it calls (:mod:`eosflow.derivative_chain`) and the half-precision
operations it computes (:func:`eosflow.precision.warn_half_precision`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import JaxprEqn, jaxprs_in_params

PyTree = Any


def equations(fn: Callable, *args: Any) -> list[JaxprEqn]:
    """The equations of ``fn(*args)``'s jaxpr and, recursively, of every sub-computation (jit, scan, cond,
    remat, custom_jvp and custom_vjp bodies), in order. The array leaves of ``args`` (or tracers, or
    shapes) are traced; the others (a Python int, say) are passed as given."""
    arrays, with_rest = array_leaves(args)
    shapes = [jax.ShapeDtypeStruct(jnp.shape(leaf), leaf.dtype) for leaf in arrays]
    found: list[JaxprEqn] = []

    def visit(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for sub in jaxprs_in_params(eqn.params):
                visit(sub)

    with warnings.catch_warnings():  # float64 shapes traced outside x64: what is read does not depend on it
        warnings.filterwarnings("ignore", message="Explicitly requested dtype", category=UserWarning)
        visit(jax.make_jaxpr(lambda *shaped: fn(*with_rest(list(shaped))))(*shapes).jaxpr)
    return found


def array_leaves(tree: PyTree) -> tuple[list, Callable[[list], PyTree]]:
    """The leaves of ``tree`` that are arrays (or tracers, or shapes), and the map that puts arrays of
    their shapes back beside its other leaves (Python numbers, strings), which it keeps as they are."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves]

    def with_rest(arrays: list) -> PyTree:
        given = iter(arrays)
        return jax.tree_util.tree_unflatten(treedef, [next(given) if a else leaf for leaf, a in zip(leaves, is_array)])

    return [leaf for leaf, a in zip(leaves, is_array) if a], with_rest
