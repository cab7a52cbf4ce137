"""JAX's persistent compilation cache, for a process that asks for it (``eosflow --compile-cache DIR``).

A run compiles ~60 programs (the steps' scans, the measurement's solver, the report's small ones): about
10 s of the demo's 18 on a laptop CPU. JAX can keep the compiled executables on disk and load them in the
next process, but by default only those that took over 1 s to compile, which are 3 of the demo's 61;
:func:`use_compile_cache` caches every one (``benchmarks/compile_cache.py``). The executables are XLA's
own, so the numbers are the same bit for bit with and without the cache. JAX keys each entry by the
program, the jax and jaxlib versions, the backend and XLA's flags, so a changed ``XLA_FLAGS`` or an
upgraded jax compiles again.

This sets JAX's configuration for the whole process: eosflow's command line calls it, an ``import
eosflow`` never does. In your own process, the same two lines::

    jax.config.update("jax_compilation_cache_dir", "/path/to/cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax

from eosflow.store import StoreError


def use_compile_cache(directory: Path) -> None:
    """Cache every program this process compiles in ``directory`` (made if missing), and load them from it.

    Raises :class:`~eosflow.store.StoreError` naming the directory if it cannot be made or written to."""
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".eosflow-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise StoreError(f"--compile-cache {directory}: cannot write a compiled program there ({reason})") from None
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def cache_settings() -> tuple[str | None, float]:
    """This process's persistent cache: its directory (None: none) and the compile time from which a program is
    kept, for worker processes to take (:func:`take_cache_settings`)."""
    config: Any = jax.config  # (its options are dynamic attributes)
    return config.jax_compilation_cache_dir, config.jax_persistent_cache_min_compile_time_secs


def take_cache_settings(settings: tuple[str | None, float]) -> None:
    """Give a worker process its parent's :func:`cache_settings`: a forked worker has a copy of the parent's
    configuration, a spawned one (macOS's default, and Python 3.14's forkserver on Linux) starts from its own."""
    directory, threshold = settings
    if directory is not None:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
