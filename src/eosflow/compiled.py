"""Functions compiled once per configuration, of which a process keeps a bounded number.

    scan = BoundedJit(scan_steps, kept=32)
    scan(process, state, n_steps)          # compiled for this configuration, or reused

As ``eqx.filter_jit``: array leaves of the arguments are traced, every other leaf (a float, a string,
a function, a static field) is part of the *configuration*, which selects the compiled program. Unlike
it, each configuration gets a ``jax.jit`` of its own and only the ``kept`` most recently used are kept:
a dropped function takes its compiled executables with it. One ``filter_jit`` keeps every configuration
it ever compiled for the life of the Python process, and a sweep's worker or a notebook compiles a new
one per lr: ~12 MB and ~390 memory maps per GD configuration on the digits MLP, until the process
reaches ``vm.max_map_count`` and LLVM aborts it (``benchmarks/compiled_memory.py``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax


class BoundedJit:
    """``fn`` compiled per configuration of its arguments, the ``kept`` most recently used kept."""

    def __init__(self, fn: Callable, kept: int, static_argnums: tuple[int, ...] = ()) -> None:
        self.fn = fn
        self.kept = kept
        self.static_argnums = static_argnums  # hashable arguments passed to the jit as static: a new value
        # compiles within the same configuration's function (e.g. a scan's length) instead of adding one
        self.compiled: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()
        self._lock = threading.Lock()  # a Dask worker runs points in threads

    def __call__(self, *args: Any) -> Any:
        held = tuple(args[i] for i in self.static_argnums)
        rest = tuple(None if i in self.static_argnums else a for i, a in enumerate(args))
        dynamic, static = eqx.partition(rest, eqx.is_array)
        leaves, treedef = jax.tree_util.tree_flatten(static)
        key = (treedef, tuple(leaves))
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


# H(w) v and H(w) [v_1 .. v_k] of an objective, compiled once per objective (its functions and sizes):
# for the host-side eigensolvers (ARPACK, power iteration, dense Hessians) and HessianOperator, called
# at many points w of one model
hvp = BoundedJit(lambda objective, w, v: objective.hvp(w, v), kept=8)
hvp_batch = BoundedJit(lambda objective, w, vectors: objective.hvp_batch(w, vectors), kept=8)
