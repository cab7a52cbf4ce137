"""Objective derivatives against central finite differences (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.config import SpecError
from eosflow.objective import Objective, cross_entropy, mse, ravel
from eosflow.problems import build_problem


def _problems():
    yield "quartic", build_problem({"name": "quartic", "dim": 3, "init": 0.5}, 0, "float64")[0]
    yield "mlp", build_problem({"name": "mlp", "width": 6, "n_train": 40, "n_test": 0}, 0, "float64")[0]
    yield (
        "mlp_ce",
        build_problem(
            {"name": "mlp", "width": 5, "n_train": 30, "n_test": 0, "loss": "cross_entropy", "activation": "swish"},
            1,
            "float64",
        )[0],
    )


PROBLEMS = dict(_problems())


def fd_grad(f, w, eps=1e-5):
    basis = np.eye(w.size)
    return np.array([(f(w + eps * e) - f(w - eps * e)) / (2 * eps) for e in basis])


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gradient_hvp_third_derivative_against_finite_differences(name):
    problem = PROBLEMS[name]
    obj = problem.objective
    rng = np.random.default_rng(0)
    w = problem.w0 + 0.1 * jnp.asarray(rng.standard_normal(problem.w0.size))
    u, v = (jnp.asarray(rng.standard_normal(w.size)) for _ in range(2))
    eps = 1e-5
    if w.size <= 60:
        np.testing.assert_allclose(
            obj.grad(w), fd_grad(lambda x: float(obj.value(x)), np.asarray(w)), rtol=1e-6, atol=1e-8
        )
    # HVP = directional derivative of the gradient
    fd_hvp = (obj.grad(w + eps * v) - obj.grad(w - eps * v)) / (2 * eps)
    np.testing.assert_allclose(obj.hvp(w, v), fd_hvp, rtol=1e-5, atol=1e-8)
    # batched HVP equals column-by-column HVPs
    V = jnp.stack([u, v], axis=1)
    np.testing.assert_allclose(obj.hvp_batch(w, V)[:, 1], obj.hvp(w, v), rtol=1e-10, atol=1e-12)
    # D^3 L[u, v, .] = d/de H(w + e u) v
    fd_third = (obj.hvp(w + eps * u, v) - obj.hvp(w - eps * u, v)) / (2 * eps)
    np.testing.assert_allclose(obj.third_derivative(w, u, v), fd_third, rtol=1e-4, atol=1e-7)
    # ... and it is symmetric in (u, v)
    np.testing.assert_allclose(obj.third_derivative(w, u, v), obj.third_derivative(w, v, u), rtol=1e-8, atol=1e-10)


def test_quartic_derivatives_closed_form():
    S, Q = 3.0, 2.0
    obj = Objective.from_function(lambda w: 0.5 * S * jnp.sum(w**2) - 0.25 * Q * jnp.sum(w**2) ** 2)
    w = jnp.array([0.3, -0.2])
    v = jnp.array([1.0, 0.5])
    r2 = float(w @ w)
    hessian = (S - Q * r2) * np.eye(2) - 2 * Q * np.outer(w, w)
    np.testing.assert_allclose(obj.grad(w), (S - Q * r2) * w, rtol=1e-12)
    np.testing.assert_allclose(obj.hvp(w, v), hessian @ v, rtol=1e-12)
    np.testing.assert_allclose(obj.hessian(w), hessian, rtol=1e-12)


def test_losses_match_their_definitions():
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    np.testing.assert_allclose(mse(pred, target), 0.5 * np.mean(np.sum((pred - target) ** 2, axis=1)))
    labels = np.array([0, 2, 1, 1, 0])
    log_softmax = pred - np.log(np.sum(np.exp(pred), axis=1, keepdims=True))
    expected = -np.mean(log_softmax[np.arange(5), labels])
    np.testing.assert_allclose(cross_entropy(pred, labels), expected, rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(pred, np.eye(3)[labels]), expected, rtol=1e-6)


def test_minibatch_and_per_example_gradients():
    problem = PROBLEMS["mlp"]
    obj, w = problem.objective, problem.w0
    per_example = obj.per_example_grads(w)
    np.testing.assert_allclose(per_example.mean(axis=0), obj.grad(w), rtol=1e-8, atol=1e-12)
    idx = jnp.array([3, 7, 11])
    np.testing.assert_allclose(
        obj.batch_grad(w, idx), per_example[np.array([3, 7, 11])].mean(axis=0), rtol=1e-8, atol=1e-12
    )


LEAVES_THAT_ARE_NOT_PARAMETERS = [
    ({"w": jnp.ones(3), "step": jnp.array(0)}, r"params\['step'\] is int(32|64).*only floating-point leaves"),
    ({"w": jnp.ones(3), "on": np.array(True)}, r"params\['on'\] is bool.*only floating-point leaves"),
    ({"w": jnp.ones(3, jnp.complex64)}, r"params\['w'\] is complex64.*real floating-point"),
]


@pytest.mark.parametrize(
    "params, message",
    [
        *LEAVES_THAT_ARE_NOT_PARAMETERS,
        ({"w": jnp.ones(3), "scale": 1.0}, r"params\['scale'\] is a Python float, not an array.*jnp.asarray"),
        ({"w": jnp.ones(3), "act": jnp.tanh}, r"params\['act'\] is a .*, not an array.*eqx.partition"),
    ],
)
def test_ravel_names_a_leaf_that_cannot_be_a_parameter(params, message):
    """A step counter, a flag, a complex leaf, a Python scalar or an Equinox module's function in
    the parameters is refused by its path, before it is silently promoted (int32 + float32 ->
    float64) or fails deep inside."""
    with pytest.raises(SpecError, match=message):
        ravel(params)
    with pytest.raises(SpecError, match=message.replace("params", "w0", 1)):
        ravel(params, where="w0")


@pytest.mark.parametrize("params, message", LEAVES_THAT_ARE_NOT_PARAMETERS)
def test_ravel_checks_traced_leaves(params, message):
    with pytest.raises(SpecError, match=message):  # under jit, as the tracker and monitor call it
        jax.jit(lambda p: ravel(p)[0])(params)
