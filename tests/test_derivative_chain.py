"""A JAX loss holding a ``jax.custom_vjp`` function, measured and simulated through reverse mode.

Oracle: the same loss written without custom_vjp (its "plain twin"), differentiated by JAX's own
forward-over-reverse, and numpy's eigh of the twin's dense float64 Hessian. Each custom backward
rule below is the exact derivative, so the twin's derivatives are the ones to reproduce.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eosflow
from eosflow.derivative_chain import ReverseModeLoss, custom_vjp_names, forward_differentiable
from eosflow.objective import Objective
from eosflow.precision import precision
from eosflow.tracing import equations
from user_models import swish


@jax.custom_vjp
def tanh(x):
    return jnp.tanh(x)


def _tanh_fwd(x):
    y = jnp.tanh(x)
    return y, y  # the residual is the output, as memory-saving rules keep it


def _tanh_bwd(y, g):
    return (g * (1 - y**2),)


tanh.defvjp(_tanh_fwd, _tanh_bwd)


@jax.custom_vjp
def log_sum_exp(z):
    return jax.nn.logsumexp(z, axis=-1)


def _lse_fwd(z):
    value = jax.nn.logsumexp(z, axis=-1)
    return value, (z, value)


def _lse_bwd(residual, g):
    z, value = residual
    return (g[..., None] * jnp.exp(z - value[..., None]),)


log_sum_exp.defvjp(_lse_fwd, _lse_bwd)


def mlp(activation):
    def apply(params, x):
        return activation(x @ params["w"] + params["b"]) @ params["v"]

    return apply


def rnn(activation):
    """h_{t+1} = act(W h_t + U x_t) over the sequence axis (a lax.scan of a jitted cell); output V h_T."""

    @jax.jit
    def cell(params, h, x):
        return activation(h @ params["w"] + x @ params["u"])

    def apply(params, x):
        h0 = jnp.zeros((x.shape[0], params["w"].shape[0]), x.dtype)
        h, _ = jax.lax.scan(lambda h, xt: (cell(params, h, xt), None), h0, jnp.swapaxes(x, 0, 1))
        return h @ params["v"]

    return apply


def cross_entropy(lse):
    def loss(logits, labels):
        picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
        return jnp.mean(lse(logits) - picked)

    return loss


def case(kind: str, seed: int):
    """(custom model, plain twin, params, inputs, targets, loss, custom loss, names) of random sizes."""
    rng = np.random.default_rng(seed)
    n, d_in, width, out = rng.integers(6, 14), rng.integers(2, 5), rng.integers(3, 7), rng.integers(2, 4)
    if kind == "rnn":
        steps = int(rng.integers(2, 5))
        params = {
            "w": rng.normal(size=(width, width)) / 2,
            "u": rng.normal(size=(d_in, width)),
            "v": rng.normal(size=(width, out)),
        }
        x = rng.normal(size=(n, steps, d_in))
        return rnn(tanh), rnn(jnp.tanh), params, x, rng.normal(size=(n, out)), "mse", "mse", ("tanh",)
    params = {
        "w": rng.normal(size=(d_in, width)),
        "b": rng.normal(size=width) / 3,
        "v": rng.normal(size=(width, out)) / 2,
    }
    x = rng.normal(size=(n, d_in))
    if kind == "mlp":
        return (
            mlp(swish),
            mlp(lambda z: z * jax.nn.sigmoid(z)),
            params,
            x,
            rng.normal(size=(n, out)),
            "mse",
            "mse",
            ("swish",),
        )
    labels = rng.integers(0, out, size=n)  # both: a custom activation and a custom loss
    plain_loss, custom_loss = cross_entropy(lambda z: jax.nn.logsumexp(z, axis=-1)), cross_entropy(log_sum_exp)
    return (
        mlp(swish),
        mlp(lambda z: z * jax.nn.sigmoid(z)),
        params,
        x,
        labels,
        plain_loss,
        custom_loss,
        ("swish", "log_sum_exp"),
    )


CASES = [("mlp", 0), ("mlp", 1), ("rnn", 2), ("rnn", 3), ("classifier", 4), ("classifier", 5)]


@pytest.mark.parametrize("kind, seed", CASES)
def test_a_model_with_a_custom_vjp_has_its_plain_twins_derivatives(kind, seed):
    custom, plain, params, x, y, plain_loss, custom_loss, names = case(kind, seed)
    with precision("float64"):
        mine, w = Objective.from_model(custom, params, x, y, custom_loss)
        twin, w_twin = Objective.from_model(plain, params, x, y, plain_loss)
        assert isinstance(mine.loss_on, ReverseModeLoss) and mine.loss_on.names == names
        assert not isinstance(twin.loss_on, ReverseModeLoss)
        np.testing.assert_array_equal(w, w_twin)
        rng = np.random.default_rng(seed + 100)
        u, v = (jnp.asarray(rng.normal(size=w.size)) for _ in range(2))
        block = jnp.asarray(rng.normal(size=(w.size, 3)))
        for what, method, args in [
            ("value", "value", (w,)),
            ("gradient", "grad", (w,)),
            ("H v", "hvp", (w, v)),
            ("H V", "hvp_batch", (w, block)),
            ("D^3 L[u, v]", "third_derivative", (w, u, v)),
            ("dense Hessian", "hessian", (w,)),
        ]:
            got, want = (eqx.filter_jit(lambda o, *a, m=method: getattr(o, m)(*a))(o, *args) for o in (mine, twin))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(want))), err_msg=what)
        if kind != "rnn":  # forward-over-reverse fails on the unwrapped loss (JAX 0.10 enters the rnn's jitted cell)
            raw = Objective(loss_on=mine.loss_on.loss_on, data=mine.data, unravel=mine.unravel)
            with pytest.raises(TypeError, match="custom_vjp"):
                eqx.filter_jit(lambda o, *a: o.hvp(*a))(raw, w, v)


@pytest.mark.parametrize("kind, seed", CASES[::2])
@pytest.mark.parametrize("microbatch", [None, 4])
def test_the_tracker_measures_a_custom_vjp_loss_as_dense_eigh_of_its_twin(kind, seed, microbatch):
    custom, plain, params, x, y, plain_loss, custom_loss, _ = case(kind, seed)
    from eosflow.objective import LOSSES

    custom_loss_fn = LOSSES[custom_loss] if isinstance(custom_loss, str) else custom_loss
    with precision("float64"):
        twin, w = Objective.from_model(plain, params, x, y, plain_loss)
        dense = np.linalg.eigvalsh(np.asarray(jax.jit(lambda w: twin.hessian(w))(w)))[::-1]
        tracker = eosflow.SharpnessTracker(
            lambda p, batch: custom_loss_fn(custom(p, batch[0]), batch[1]),
            k=2,
            tol=1e-8,
            max_iters=200,
            microbatch=microbatch,
        )
        state = tracker.init(params, jax.random.PRNGKey(seed))
        _, pairs = jax.jit(tracker.update)(state, params, (x, y))
        np.testing.assert_allclose(pairs.values, dense[:2], rtol=1e-7)
        operator = eosflow.HessianOperator.from_function(lambda p: custom_loss_fn(custom(p, x), y), params)
        np.testing.assert_allclose(
            operator @ np.eye(w.size), np.asarray(jax.jit(lambda w: twin.hessian(w))(w)), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize(
    "kind, seed, processes",
    [
        ("mlp", 6, ["gd", "central_flow", "sgd", "langevin"]),  # minibatch and per-example gradients
        ("rnn", 7, ["gd", "central_flow", "rod_flow"]),
        ("classifier", 10, ["rmsprop", "rmsprop_central_flow"]),  # preconditioned HVPs
    ],
)
@pytest.mark.filterwarnings("ignore::eosflow.compare.CriticalSetWarning")  # RMSProp starts critical: both runs say so
def test_processes_on_a_custom_vjp_model_follow_its_twin(kind, seed, processes):
    custom, plain, params, x, y, plain_loss, custom_loss, _ = case(kind, seed)
    runs = []
    for model, loss in ((custom, custom_loss), (plain, plain_loss)):
        problem = eosflow.Problem.from_model(model, params, x, y, loss)
        with precision("float64"):
            hessian = np.asarray(
                jax.jit(lambda w, problem=problem: problem.objective.hessian(w))(jnp.asarray(problem.w0))
            )
            lr = 1.5 / float(np.linalg.eigvalsh(hessian)[-1])
        lr = lr if processes[0] == "gd" else lr / 50
        options = {name: {"batch_size": 4} for name in processes if name in ("sgd", "langevin")}
        runs.append(eosflow.simulate(problem, lr=lr, steps=12, processes=processes, options=options))
    for name in ("loss", "eigenvalues"):
        np.testing.assert_allclose(runs[0][name].values, runs[1][name].values, rtol=1e-8, err_msg=name)
    assert runs[0].attrs["status"] == runs[1].attrs["status"]


def test_a_loss_function_of_a_pytree_with_a_custom_vjp_is_simulated():
    rng = np.random.default_rng(8)
    target = rng.normal(size=(3, 4))
    start = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(2, 4))}

    def loss_of(activation):
        return lambda p: 0.5 * jnp.sum((activation(p["a"]) @ p["b"] - target) ** 2)

    problem, twin = (eosflow.Problem.from_function(loss_of(act), start) for act in (tanh, jnp.tanh))
    assert isinstance(problem.objective.loss_on, ReverseModeLoss)
    runs = [eosflow.simulate(p, lr=0.3, steps=8, processes=["gd", "central_flow"]) for p in (problem, twin)]
    np.testing.assert_allclose(runs[0]["loss"].values, runs[1]["loss"].values, rtol=1e-9)


def test_plain_losses_are_left_as_they_are_and_the_chain_names_what_it_cannot_do():
    _, plain, params, x, y, *_ = case("mlp", 9)
    with precision("float64"):
        twin, w = Objective.from_model(plain, params, x, y)
        traced = equations(twin.loss_on, w, twin.data)
        assert forward_differentiable(twin.loss_on, traced) is twin.loss_on
        assert custom_vjp_names(traced) == ()
        mine, _ = Objective.from_model(mlp(swish), params, x, y)
        u = jnp.ones_like(w)
        with pytest.raises(
            NotImplementedError,
            match="fourth derivatives of a loss with the custom_vjp function swish are not available",
        ):
            jax.jvp(lambda a: mine.third_derivative(a, u, u), (w,), (u,))
        with pytest.raises(NotImplementedError, match="in the parameters only, not in its batch"):
            jax.grad(lambda inputs: mine.loss_on(w, (inputs, mine.data[1])))(mine.data[0])


def test_a_neural_ode_is_measured_and_a_third_derivative_jax_cannot_take_is_named():
    """jax.experimental.ode.odeint is a custom_vjp (its adjoint). H v: against jacrev(jacrev) of the raw loss (an
    oracle that never enters forward mode); D^3 L: against central differences of H v if JAX takes it, else (JAX
    0.10 fails inside odeint's backward) a ValueError naming the function and the processes that need it."""
    from jax.experimental.ode import odeint

    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(16, 2)), np.sin(rng.normal(size=(16, 2)))
    params = {"w": rng.normal(size=(2, 2)) / 2, "b": rng.normal(size=2) / 4}

    def apply(p, x):
        field = lambda h, t, p: jnp.tanh(h @ p["w"] + p["b"])  # noqa: E731
        return odeint(field, x, jnp.array([0.0, 1.0]), p, rtol=1e-10, atol=1e-10)[-1]

    problem = eosflow.Problem.from_model(apply, params, x, y)
    objective = problem.objective
    assert objective.loss_on.names == ("_odeint",)
    with precision("float64"):
        w = jnp.asarray(problem.w0)
        dense = np.asarray(jax.jit(jax.jacrev(jax.jacrev(objective.loss_on.loss_on)))(w, objective.data))
        np.testing.assert_allclose(objective.hessian(w), dense, rtol=1e-7, atol=1e-9)
        u = jnp.asarray(rng.normal(size=w.size))
        try:
            third = np.asarray(objective.third_derivative(w, u, u))
        except ValueError as error:
            assert "third derivatives of a loss with the custom_vjp function _odeint" in str(error)
            assert "central_flow, projected_flow, rmsprop_central_flow" in str(error)
        else:
            step = 1e-4
            differences = (objective.hvp(w + step * u, u) - objective.hvp(w - step * u, u)) / (2 * step)
            np.testing.assert_allclose(third, differences, rtol=1e-5, atol=1e-8)
    ds = eosflow.simulate(problem, lr=0.5, steps=3, processes=["gd"])
    assert ds.attrs["status"] == "completed" and np.all(np.isfinite(ds["loss"].values))
    np.testing.assert_allclose(ds["eigenvalues"].values[0, 0, 0], np.linalg.eigvalsh(dense)[-1], rtol=1e-6)


@pytest.mark.parametrize("repeats", [0, 2])
def test_a_python_number_in_the_batch_stays_a_python_number(repeats):
    """The chain traces its arguments, so a loss that uses a batch leaf as a Python int (a loop count) would see
    a tracer: only the array leaves go through it, the rest is closed over as given."""

    def loss_with(activation):
        def loss(p, batch):
            x, count = batch
            out = activation(x @ p["w"])
            for _ in range(count):
                out = jnp.tanh(out)
            return jnp.mean(out**2)

        return loss

    rng = np.random.default_rng(12 + repeats)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)))}
    x = jnp.asarray(rng.normal(size=(8, 3)))
    with precision("float64"):
        flat, unflatten = ravel_pytree(params)
        plain = loss_with(lambda z: z * jax.nn.sigmoid(z))
        dense = np.asarray(jax.jit(jax.hessian(lambda f: plain(unflatten(f), (x, repeats))))(flat))
        tracker = eosflow.SharpnessTracker(loss_with(swish), k=2, tol=1e-9, max_iters=100)
        _, pairs = tracker.update(tracker.init(params, jax.random.PRNGKey(0)), params, (x, repeats))
        np.testing.assert_allclose(pairs.values, np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-8)
