"""Compiled programs of a function, of which a process keeps a bounded number.

    scan = BoundedJit(scan_steps, kept=32)
    scan(process, state, n_steps)          # compiled for these arguments' program, or reused

As ``eqx.filter_jit``: array leaves of the arguments are traced, every other leaf (a float, a string,
a function, a static field) is part of the *configuration*. A program is compiled per key

    (configuration, type of every array leaf (shape, dtype, weak type; device if committed),
     static arguments, jax_enable_x64, jax_default_matmul_precision)

-- the same distinctions ``jax.jit`` makes -- and each key gets a ``jax.jit`` of its own, which holds
that one executable; only the ``kept`` most recently used are kept, and a dropped one takes its
executable with it. So at most ``kept`` executables are alive whatever the mix of configurations,
shapes (a tracked eigenspace growing k = 1 .. k_max) and scan lengths, while a run that reuses a
key reuses its program: no more compilations than one ``jax.jit`` makes, as long as a run's keys
in use fit in ``kept``.

Why: an executable maps ~390 memory regions (the digits MLP's GD scan), and a process that reaches
``vm.max_map_count`` (65530 by default) dies in LLVM ("Cannot allocate memory"). One ``filter_jit``
keeps every program it ever compiled for the life of the process; a bound per configuration alone
(each configuration's ``jax.jit`` keeping an executable per shape and length) still let a sweep of
growing-k runs pass the limit (``benchmarks/compiled_memory.py``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax

from eosflow.precision import thread_settings


class BoundedJit:
    """``fn`` compiled per configuration, array types and static arguments; the ``kept`` most
    recently used programs (one executable each) kept."""

    def __init__(self, fn: Callable, kept: int, static_argnums: tuple[int, ...] = ()) -> None:
        self.fn = fn
        self.kept = kept
        self.static_argnums = static_argnums  # hashable arguments passed to the jit as static (e.g. a scan's length)
        self.compiled: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()
        self._lock = threading.Lock()  # a Dask worker runs points in threads

    def __call__(self, *args: Any) -> Any:
        held = tuple(args[i] for i in self.static_argnums)
        rest = tuple(None if i in self.static_argnums else a for i, a in enumerate(args))
        dynamic, static = eqx.partition(rest, eqx.is_array)
        static_leaves, static_def = jax.tree_util.tree_flatten(static)
        arrays, array_def = jax.tree_util.tree_flatten(dynamic)
        types = tuple(map(program_type, arrays))
        key = (static_def, tuple(static_leaves), array_def, types, held, thread_settings())
        with self._lock:
            compiled = self.compiled.pop(key, None) or self._compile(static)
            self.compiled[key] = compiled
            while len(self.compiled) > self.kept:
                self.compiled.popitem(last=False)
        return compiled(dynamic, *held)

    def _compile(self, static: tuple) -> Callable:
        fn, positions = self.fn, self.static_argnums

        def call(dynamic: tuple, *held: Any) -> Any:
            args = list(eqx.combine(dynamic, static))
            for i, value in zip(positions, held, strict=True):
                args[i] = value
            return fn(*args)

        return jax.jit(call, static_argnums=tuple(range(1, 1 + len(positions))))


def program_type(array: Any) -> Hashable:
    """What ``jax.jit`` compiles another program for in an array argument: its type (shape, dtype,
    weak type) and, if committed to a device, its placement. A NumPy array and an uncommitted JAX
    array of one type share a program."""
    return jax.typeof(array), array.sharding if getattr(array, "committed", False) else None


# H(w) v and H(w) [v_1 .. v_k] of an objective, compiled once per objective (its functions and sizes)
# and number of vectors: for the host-side eigensolvers (ARPACK, power iteration, dense Hessians) and
# HessianOperator, called at many points w of one model
hvp = BoundedJit(lambda objective, w, v: objective.hvp(w, v), kept=8)
hvp_batch = BoundedJit(lambda objective, w, vectors: objective.hvp_batch(w, vectors), kept=8)
gauss_newton_batch = BoundedJit(lambda product, w, vectors, batch: product(w, vectors, batch), kept=8)
