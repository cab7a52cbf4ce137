"""BoundedJit: at most ``kept`` compiled executables alive, whatever the configurations, shapes and lengths."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.compiled import BoundedJit


def _geometric(scale, x, n_steps):
    """x, x * scale, .., x * scale**n_steps: ``n_steps`` steps of a scan (x: [d])."""
    return jax.lax.scan(lambda s, _: (s * scale, s), x, None, length=n_steps)


def test_live_executables_are_bounded_whatever_the_shapes_and_lengths():
    """Two configurations (the scale, a Python float) x three shapes x two scan lengths, as a
    sweep of runs whose tracked eigenspace grows: 12 programs. A jit per configuration kept all 12
    (six executables in each of the two kept jits); now at most ``kept`` = 3 are alive, each jit
    holds one executable, and a dropped one is freed. Repeated calls reuse their program."""
    traces = []

    def counted(scale, x, n_steps):
        traces.append((scale, x.shape, n_steps))
        return _geometric(scale, x, n_steps)

    bounded = BoundedJit(counted, kept=3, static_argnums=(2,))
    jits = []  # weak references to every jit made: the dropped ones must be collected
    calls = [(scale, d, n) for scale in (0.5, 2.0) for d in (1, 2, 3) for n in (2, 3)]
    for i, (scale, d, n) in enumerate(calls):
        x = jnp.arange(1.0, d + 1.0)
        for _ in range(2):  # the second call reuses the first's program
            final, history = bounded(scale, x, n)
            np.testing.assert_allclose(final, np.arange(1.0, d + 1.0) * scale**n, rtol=1e-12)
            np.testing.assert_allclose(history[-1], np.arange(1.0, d + 1.0) * scale ** (n - 1), rtol=1e-12)
        jits.extend(weakref.ref(f) for f in bounded.compiled.values() if all(r() is not f for r in jits))
        assert len(traces) == i + 1  # one compilation per distinct program, none for the repeat
        assert len(bounded.compiled) == min(i + 1, 3)
        assert [f._cache_size() for f in bounded.compiled.values()] == [1] * min(i + 1, 3)  # JAX's own count
    gc.collect()
    assert len(jits) == len(calls) and sum(r() is not None for r in jits) == 3  # the dropped ones are freed
    bounded(2.0, jnp.arange(1.0, 4.0), 3)  # the most recent program: no compilation
    assert len(traces) == len(calls)


def test_programs_are_told_apart_by_dtype_weak_type_placement_and_precision():
    """What ``jax.jit`` compiles another executable for gets a program of its own: float32 and
    float64 arrays, a weakly typed scalar array and a strong one, an array committed to a device,
    and the same NumPy input under float32 and float64 precision (``jax.enable_x64``, which
    eosflow.precision scopes per run). A NumPy array shares the program of a JAX array of its type."""
    bounded = BoundedJit(lambda scale, x: x * scale, kept=8)
    bounded(2.0, jnp.ones(2, jnp.float32))
    bounded(2.0, jnp.ones(2, jnp.float64))
    bounded(2.0, jnp.asarray(1.0))  # weakly typed
    bounded(2.0, jnp.asarray(1.0, jnp.float64))
    bounded(2.0, jax.device_put(jnp.ones(2, jnp.float64), jax.devices()[0]))  # committed
    with jax.enable_x64(False):
        assert bounded(2.0, np.ones(2)).dtype == jnp.float32
    assert [f._cache_size() for f in bounded.compiled.values()] == [1] * 6
    np.testing.assert_array_equal(bounded(2.0, np.ones(2)), [2.0, 2.0])  # as jnp.ones(2, float64)'s
    assert len(bounded.compiled) == 6
