"""A run's floating-point precision: scoped, never global, and checked where user arrays enter.

JAX computes in float32 unless ``jax_enable_x64`` is on. eosflow never changes that setting for
the process; a run enters :func:`precision` for its spec's ``dtype`` instead (``jax.enable_x64``
is a thread-local context manager, and the flag is part of JAX's jit cache key, so float32 and
float64 runs in one process each compile and compute in their own precision). The user's own
arrays are checked at the boundary by :func:`check_dtypes`, which names the offending leaf.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.config import SpecError

if TYPE_CHECKING:
    from jax.extend.core import JaxprEqn

DTYPES = ("float32", "float64")


MATMUL_PRECISION = "highest"  # float32 dots and convolutions in float32, not TF32 (GPU) or bfloat16 passes (TPU)


@contextlib.contextmanager
def precision(dtype: Any) -> Iterator[None]:
    """Compute in ``dtype`` inside the block: float64 turns ``jax_enable_x64`` on for the block
    (this thread only), float32 turns it off; the caller's setting is restored on exit. Matrix
    products and convolutions are traced at :data:`MATMUL_PRECISION` (``jax.default_matmul_precision``,
    as scoped): JAX's default computes float32 ones in TF32 on recent NVIDIA GPUs (10 mantissa bits)
    and in bfloat16 passes on TPUs, below what the eigensolver's residual contract needs. On the CPU
    the two compile to the same numbers."""
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise SpecError(f"`dtype` = {name!r} is not one of {', '.join(DTYPES)}")
    with jax.enable_x64(name == "float64"), jax.default_matmul_precision(MATMUL_PRECISION):
        yield


def thread_settings() -> tuple[bool, Any]:
    """This thread's ``jax_enable_x64`` and default matmul precision: what :func:`precision` scopes, which JAX keeps
    per thread (and keys its compiled programs on, :mod:`eosflow.compiled`)."""
    return bool(jax.config.read("jax_enable_x64")), jax.default_matmul_precision.value


@contextlib.contextmanager
def entered(settings: tuple[bool, Any]) -> Iterator[None]:
    """Compute inside the block under another thread's :func:`thread_settings` (a thread starts with the process's)."""
    x64, matmul = settings
    with jax.enable_x64(x64), jax.default_matmul_precision(matmul):
        yield


CAST_ARRAYS = (
    'cast it (e.g. `.astype("{dtype}")`, or `jax.tree.map(lambda a: a.astype("{dtype}"), params)` for a whole model)'
)


def check_dtypes(tree: Any, dtype: Any, where: str, cast: str | None = None) -> None:
    """Every floating-point leaf of ``tree`` has ``dtype``; else a SpecError naming the leaf
    (``where`` + its path), its dtype and the two fixes: ``cast`` (``{dtype}`` in it is the run's dtype;
    default: the array's ``astype``), or the run's dtype. Integer leaves (labels) are allowed.

    ``tree`` may hold arrays or anything with a ``dtype`` (a ``jax.ShapeDtypeStruct``).
    """
    expected = np.dtype(dtype)
    for path, name in floating_leaves(tree):
        if name == expected.name:
            continue
        other_run = f' or set dtype = "{name}" for the run' if name in DTYPES else ""
        fix = cast or CAST_ARRAYS
        raise SpecError(
            f"{where}{path} is {name} but this run computes in {expected.name}: {fix.format(dtype=expected.name)}"
            f"{other_run}"
        )


def floating_leaves(tree: Any) -> list[tuple[str, str]]:
    """(path, dtype name) of every floating-point leaf of ``tree`` (arrays, or anything with a ``dtype``), the path
    as ``jax.tree_util.keystr`` writes it (``['w']``)."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):  # (NumPy does not count bfloat16 as floating)
            found.append((jax.tree_util.keystr(path), np.dtype(dtype).name))
    return found


HALF_PRECISION = ("bfloat16", "float16")


class HalfPrecisionWarning(UserWarning):
    """A loss with float32 or float64 parameters computes some operations in bfloat16 or float16."""


def warn_half_precision(equations: list[JaxprEqn], where: str) -> None:
    """Warn (:class:`HalfPrecisionWarning`) if a trace of the loss (:func:`eosflow.tracing.equations`) computes
    in bfloat16 or float16, as mixed-precision layers do (``dtype=jnp.bfloat16`` beside float32
    parameters): its HVPs then carry half-precision rounding (bfloat16: 2^-8 ~ 4e-3 relative per
    operation), which the eigensolver's relative residuals, computed from the same products, do not see."""
    found: dict[str, dict[str, None]] = {}
    for eqn in equations:
        for var in eqn.outvars:
            name = str(getattr(getattr(var, "aval", None), "dtype", ""))  # (str: a PRNG key's dtype is no np.dtype)
            if name in HALF_PRECISION:
                found.setdefault(name, {})[eqn.primitive.name] = None
    warn_half_precision_ops(found, where)


def warn_half_precision_ops(found: dict[str, dict[str, None]], where: str) -> None:
    """The :class:`HalfPrecisionWarning` for operations ``found`` ({dtype name: operation names}), if any."""
    if found:
        kinds = "; ".join(f"{dtype}: {', '.join(list(ops)[:6])}" for dtype, ops in found.items())
        warnings.warn(
            f"{where} computes in half precision ({kinds}): its Hessian-vector products carry that rounding "
            "(~4e-3 relative per bfloat16 operation), so eigenvalues and residuals are only as accurate; "
            "to measure the float32 function, compute it in float32 (e.g. the layers' dtype)",
            HalfPrecisionWarning,
            stacklevel=4,
        )
