"""A loss with float32 parameters that computes in bfloat16 or float16 (mixed-precision layers) is measured,
with a HalfPrecisionWarning naming where and which operations; a float32 loss is measured silently.

Oracle for "silently": the same entry points on the float32 twin raise no warning at all (warnings as errors).
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.precision import HalfPrecisionWarning


def model(compute_dtype):
    """A dense tanh layer whose matmul and activation run in ``compute_dtype`` (the layers' ``dtype`` of a
    mixed-precision policy), its parameters and output float32."""

    def apply(params, x):
        h = jnp.tanh(x.astype(compute_dtype) @ params["w"].astype(compute_dtype))
        return h.astype(jnp.float32) @ params["v"]

    return apply


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32) / 3,
    }
    return (
        params,
        jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
        jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
    )


def entry_points(apply, params, x, y):
    """Each place a JAX loss enters eosflow, called once."""
    loss = lambda p, batch: eosflow.objective.mse(apply(p, batch[0]), batch[1])  # noqa: E731
    eosflow.Problem.from_model(apply, params, x, y)
    eosflow.Problem.from_function(lambda p: loss(p, (x, y)), params)
    eosflow.HessianOperator.from_function(loss, params, (x, y))
    tracker = eosflow.SharpnessTracker(loss, k=1)
    tracker.update(tracker.init(params, jax.random.PRNGKey(0)), params, (x, y))
    return 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_compute_is_named_at_every_entry(dtype, data):
    params, x, y = data
    with pytest.warns(HalfPrecisionWarning) as record:
        entries = entry_points(model(dtype), params, x, y)
    messages = [str(w.message) for w in record if w.category is HalfPrecisionWarning]
    assert len(messages) >= entries
    name = jnp.dtype(dtype).name
    assert all(f"({name}: " in m and "dot_general" in m and "tanh" in m for m in messages), messages
    where = [
        "loss(model(params, inputs), targets)",
        "loss_fn(w0)",
        "loss_fn",
        "SharpnessTracker: loss_fn(params, batch)",
    ]
    assert all(any(m.startswith(w + " computes in half precision") for m in messages) for w in where), messages


def test_a_float32_loss_is_measured_silently(data):
    params, x, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry_points(model(jnp.float32), params, x, y)


def test_the_half_precision_hessian_differs_from_the_float32_one_by_its_rounding(data):
    """What the warning says: the tracker measures the bfloat16 computation, whose top eigenvalue is off the
    float32 model's by the rounding of bfloat16 (more than float32's, less than a few percent)."""
    params, x, y = data
    values = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        apply = model(dtype)

        def loss(p, batch, apply=apply):
            return eosflow.objective.mse(apply(p, batch[0]), batch[1])

        tracker = eosflow.SharpnessTracker(loss, k=1, tol=1e-3, max_iters=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HalfPrecisionWarning)
            _, pairs = eqx.filter_jit(tracker.update)(tracker.init(params, jax.random.PRNGKey(0)), params, (x, y))
        values[jnp.dtype(dtype).name] = float(pairs.values[0])
    relative = abs(values["bfloat16"] - values["float32"]) / values["float32"]
    assert 1e-5 < relative < 5e-2, values
