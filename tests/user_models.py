"""A model and a loss that eosflow does not ship, as a user's own module would define them.

Nothing here is registered: specs name the factory by import path, ``"user_models:make_problem"``
(the tests directory is on the path of pytest and of the sweep tests' Dask workers).
"""

import jax
import jax.numpy as jnp
import numpy as np

import eosflow


def apply(params, inputs):
    """A one-hidden-layer softplus network with a linear skip connection."""
    hidden = jax.nn.softplus(inputs @ params["hidden"]["w"] + params["hidden"]["b"])
    return hidden @ params["out"] + inputs[:, :2] @ params["skip"]


def log_cosh(predictions, targets):
    """mean_i sum_j log cosh(f_ij - y_ij): quadratic near zero, linear in the tails."""
    return jnp.mean(jnp.sum(jnp.logaddexp(predictions - targets, targets - predictions) - jnp.log(2.0), axis=-1))


def make_problem(width: int = 8, n: int = 40, seed: int = 0, dtype: str = "float32", scale: float = 1.5):
    """Random inputs in R^3, targets from a fixed nonlinear teacher; params drawn with numpy."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((n, 3)).astype(dtype)
    targets = np.stack([np.sin(2 * inputs[:, 0]) + inputs[:, 1] * inputs[:, 2], np.cos(inputs[:, 1])], 1).astype(dtype)
    params = {
        "hidden": {"w": scale * rng.standard_normal((3, width)) / np.sqrt(3), "b": np.zeros(width)},
        "out": scale * rng.standard_normal((width, 2)) / np.sqrt(width),
        "skip": np.zeros((2, 2)),
    }
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype=dtype), params)
    return eosflow.Problem.from_model(apply, params, inputs, targets, loss=log_cosh, info={"width": width})


not_a_factory = 3


def returns_a_dict(**keys):
    return dict(keys)


@jax.custom_vjp
def swish(x):
    """x sigmoid(x), with a hand-written backward rule (its exact derivative), as memory-saving code writes it."""
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    return swish(x), x


def _swish_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s + x * s * (1 - s)),)


swish.defvjp(_swish_fwd, _swish_bwd)
