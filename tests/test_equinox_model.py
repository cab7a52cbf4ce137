"""Problem.from_equinox: an Equinox model (with BatchNorm state, dropout) against the same network
written out by hand in jnp (batch statistics explicit), a hand-written Equinox training loop that
threads its state, Problem.from_model with the manual partition, and dense Hessians."""

import warnings

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eosflow
from eosflow.config import SpecError
from eosflow.optim.sgd import sample_batch
from eosflow.process import process_key

N, EPS = 24, 1e-5


class Net(eqx.Module):
    """x -> Linear -> tanh -> [BatchNorm] -> [Dropout] -> Linear, on one example (4,) -> (3,)."""

    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm | None
    drop: eqx.nn.Dropout | None
    last: eqx.nn.Linear

    def __init__(self, key, norm: str | None = "batch", dropout: float = 0.0, axis_name="batch"):
        k1, k2 = jax.random.split(key)
        self.first, self.last = eqx.nn.Linear(4, 6, key=k1), eqx.nn.Linear(6, 3, key=k2)
        self.norm = None if norm is None else eqx.nn.BatchNorm(6, axis_name, mode=norm, momentum=0.9)
        self.drop = eqx.nn.Dropout(dropout) if dropout else None

    def __call__(self, x, state=None):
        h = jnp.tanh(self.first(x))
        if self.norm is not None:
            h, state = self.norm(h, state)
        if self.drop is not None:
            h = self.drop(h)
        y = self.last(h)
        return y if state is None else (y, state)


class ConvNet(eqx.Module):
    """(1, 6, 6) -> Conv 3x3 (3 channels) -> BatchNorm -> tanh -> Linear -> (3,)."""

    conv: eqx.nn.Conv2d
    norm: eqx.nn.BatchNorm
    last: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv, self.last = eqx.nn.Conv2d(1, 3, 3, key=k1), eqx.nn.Linear(48, 3, key=k2)
        self.norm = eqx.nn.BatchNorm(3, "examples", mode="batch")

    def __call__(self, x, state):
        h, state = self.norm(self.conv(x), state)
        return self.last(jnp.tanh(h).reshape(-1)), state


def data(shape=(4,)):
    rng = np.random.default_rng(5)
    return jnp.asarray(rng.normal(size=(N, *shape))), jnp.asarray(rng.normal(size=(N, 3)))


def by_hand(params, x, mixture=None):
    """Net written out: BatchNorm with the batch's mean and (biased) variance per feature, or
    ``(1 - m) batch + m running`` for a trained EMA state ``mixture = (m, running mean, running var)``."""
    h = jnp.tanh(x @ params["W1"].T + params["b1"])
    mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
    if mixture is not None:
        m, running_mean, running_var = mixture
        mean, var = (1 - m) * mean + m * running_mean, (1 - m) * var + m * running_var
    h = (h - mean) / jnp.sqrt(var + EPS) * params["gamma"] + params["beta"]
    return h @ params["W2"].T + params["b2"]


def weights(model: Net) -> dict:
    return {
        "W1": model.first.weight,
        "b1": model.first.bias,
        "gamma": model.norm.weight,
        "beta": model.norm.bias,
        "W2": model.last.weight,
        "b2": model.last.bias,
    }


def mse(f, y):
    return 0.5 * jnp.mean(jnp.sum((f - y) ** 2, axis=-1))


@pytest.mark.parametrize("seed", [0, 1])
def test_batchnorm_in_training_mode_is_the_batch_statistics_loss(seed):
    """Value, gradient and dense Hessian of the problem equal those of the network written by hand with
    the full batch's statistics (float64), the gradient also against central finite differences."""
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(seed))
    x, y = data()
    problem = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
    assert problem.info["norm_layers"] == "batch statistics (training mode): model.norm"
    w0 = jnp.asarray(problem.w0)
    unravel = problem.objective.unravel

    def oracle(w):
        return mse(by_hand(weights(eqx.combine(unravel(w), model)), x), y)

    assert abs(float(problem.objective.value(w0)) - float(oracle(w0))) < 1e-13
    np.testing.assert_allclose(problem.objective.grad(w0), jax.grad(oracle)(w0), rtol=0, atol=1e-12)
    v = jnp.asarray(np.random.default_rng(seed).normal(size=w0.shape))
    fd = (problem.objective.value(w0 + 1e-6 * v) - problem.objective.value(w0 - 1e-6 * v)) / 2e-6
    assert abs(float(fd) - float(problem.objective.grad(w0) @ v)) < 1e-7
    dense = jax.jit(jax.hessian(oracle))(w0)
    np.testing.assert_allclose(problem.objective.hvp(w0, v), dense @ v, rtol=0, atol=1e-10)
    # inference mode (the running statistics of a fresh state, 0 and 1) is another function
    frozen = eosflow.Problem.from_equinox(eqx.nn.inference_mode(model), x, y, loss="mse", state=state)
    assert abs(float(frozen.objective.value(w0)) - float(problem.objective.value(w0))) > 1e-3
    assert "norm_layers" not in frozen.info


@pytest.mark.parametrize(("lr", "build"), [(0.05, Net), (0.8, Net), (0.3, ConvNet)])
def test_gd_equals_a_hand_written_equinox_loop_that_threads_its_state(lr, build, tmp_path):
    """25 GD steps: eosflow's losses and iterates equal an Equinox training loop (filter_value_and_grad
    with the state threaded and updated, as users write it) to 1e-12; the user's model and state are
    untouched and still usable."""
    model, state = eqx.nn.make_with_state(build)(jax.random.key(3))
    x, y = data((1, 6, 6) if build is ConvNet else (4,))
    axis = "examples" if build is ConvNet else "batch"
    problem = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
    ds = eosflow.simulate(
        problem,
        lr=lr,
        steps=25,
        processes=["gd"],
        spectrum={"every": 0},
        out=tmp_path / "r",
        record={"params_every": 1},
    )

    def loss_fn(m, s):
        f, s = jax.vmap(m, axis_name=axis, in_axes=(0, None), out_axes=(0, None))(x, s)
        return mse(f, y), s

    assert np.isfinite(loss_fn(model, state)[0])  # the user's state was not consumed by eosflow
    step = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))
    m, s, losses = model, state, []
    for _ in range(25):
        (loss, s), grads = step(m, s)
        losses.append(float(loss))
        m = eqx.apply_updates(m, jax.tree_util.tree_map(lambda g: -lr * g, grads))
    np.testing.assert_allclose(ds.loss.sel(process="gd").values, losses, rtol=1e-12)
    assert losses[-1] != losses[0]
    _, positions = eosflow.load_params(tmp_path / "r", "gd")
    flat, _ = jax.flatten_util.ravel_pytree(eqx.filter(m, eqx.is_inexact_array))
    last = jnp.asarray(positions[-1])
    np.testing.assert_allclose(last - lr * problem.objective.grad(last), flat, atol=1e-12)


def test_sgd_normalizes_each_minibatch_and_refuses_single_examples():
    """SGD's minibatch losses are the hand-written network's on each minibatch's own statistics (batch 8,
    sample_batch's rows); per-example gradients and batch_size = 1 are refused naming the layer."""
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(4))
    x, y = data()
    problem = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
    ds = eosflow.simulate(
        problem, lr=0.2, steps=6, seed=7, processes=["sgd"], options={"sgd": {"batch_size": 8}}, spectrum={"every": 0}
    )
    key, params = process_key(7, "sgd/minibatches"), weights(model)
    grad = jax.value_and_grad(lambda p, rows: mse(by_hand(p, x[rows]), y[rows]))
    for step, expected in enumerate(ds.batch_loss.sel(process="sgd").values):
        rows = sample_batch(key, jnp.asarray(step), N, 8, "with_replacement")
        loss, g = grad(params, rows)
        assert abs(float(loss) - expected) < 1e-12, step
        params = jax.tree_util.tree_map(lambda p, d: p - 0.2 * d, params, g)
    with pytest.raises(ValueError, match=r"BatchNorm layers in training mode \(model.norm\).*one example"):
        problem.objective.per_example_grads(jnp.asarray(problem.w0))
    with pytest.raises(ValueError, match="batch_size = 1"):
        eosflow.simulate(problem, lr=0.2, steps=2, processes=["sgd"], options={"sgd": {"batch_size": 1}})


def test_a_model_without_state_equals_the_manual_partition():
    """No BatchNorm: from_equinox is from_model with eqx.partition and a vmap, bitwise."""
    model = Net(jax.random.key(6), norm=None)
    x, y = data()
    ours = eosflow.Problem.from_equinox(model, x, y, loss="mse")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    manual = eosflow.Problem.from_model(lambda p, xs: jax.vmap(eqx.combine(p, static))(xs), params, x, y, "mse")
    np.testing.assert_array_equal(ours.w0, manual.w0)
    w, v = jnp.asarray(ours.w0), jnp.ones_like(jnp.asarray(ours.w0))
    assert float(ours.objective.value(w)) == float(manual.objective.value(w))
    np.testing.assert_array_equal(ours.objective.hvp(w, v), manual.objective.hvp(w, v))


def test_ema_batchnorm_fresh_state_is_batch_statistics_and_a_trained_state_warns():
    """mode='ema': a fresh state normalizes by the batch alone (as mode='batch'); after training steps the
    forward mixes the running statistics in, which eosflow holds fixed: a warning naming the layer, and
    the loss is the hand-written mixture."""
    model, state = eqx.nn.make_with_state(lambda key: Net(key, norm="ema"))(jax.random.key(8))
    x, y = data()
    fresh = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
    w0 = jnp.asarray(fresh.w0)
    assert abs(float(fresh.objective.value(w0)) - float(mse(by_hand(weights(model), x), y))) < 1e-13
    trained = state
    for shift in (0.0, 0.5):  # two training forwards on shifted data: running statistics away from the batch's
        _, trained = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x + shift, trained)
    with pytest.warns(UserWarning, match=r"model.norm is eqx.nn.BatchNorm\(mode='ema'\).*holds fixed"):
        mixed = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=trained)
    running = trained.get(model.norm.ema_state_index)
    expected = mse(by_hand(weights(model), x, (0.9, *running)), y)
    assert abs(float(mixed.objective.value(w0)) - float(expected)) < 1e-13
    assert abs(float(expected) - float(fresh.objective.value(w0))) > 1e-4


def test_refusals_name_the_layer():
    x, y = data()
    with pytest.raises(SpecError, match=r"model.drop is eqx.nn.Dropout\(p=0.5\) in training mode"):
        eosflow.Problem.from_equinox(Net(jax.random.key(0), norm=None, dropout=0.5), x, y)
    quiet = eqx.nn.inference_mode(Net(jax.random.key(0), norm=None, dropout=0.5))
    plain = Net(jax.random.key(0), norm=None)
    a, b = (eosflow.Problem.from_equinox(m, x, y) for m in (quiet, plain))
    assert float(a.objective.value(jnp.asarray(a.w0))) == float(b.objective.value(jnp.asarray(b.w0)))
    with pytest.raises(SpecError, match=r"BatchNorm layers \(model.norm\), which need their state"):
        eosflow.Problem.from_equinox(Net(jax.random.key(0)), x, y)
    with pytest.raises(SpecError, match="model.first.weight has shape|targets have shape"):
        eosflow.Problem.from_equinox(Net(jax.random.key(0), norm=None), x, y[:, :2])
    model, state = eqx.nn.make_with_state(lambda key: Net(key, axis_name="other"))(jax.random.key(0))
    problem = eosflow.Problem.from_equinox(model, x, y, state=state)  # the layers' axis name is found
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(float(problem.objective.value(jnp.asarray(problem.w0))))


def test_adam_on_an_equinox_batchnorm_model_equals_optax():
    """Adam (an adaptive process) on the problem equals optax.adam in the hand-written loop, 20 steps."""
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(9))
    x, y = data()
    problem = eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
    ds = eosflow.simulate(problem, lr=0.01, steps=20, processes=["adam"], spectrum={"every": 0})
    params = weights(model)
    optimizer = optax.adam(0.01, b1=0.9, b2=0.999, eps=1e-8)
    opt_state, losses = optimizer.init(params), []
    for _ in range(20):
        loss, g = jax.value_and_grad(lambda p: mse(by_hand(p, x), y))(params)
        losses.append(float(loss))
        updates, opt_state = optimizer.update(g, opt_state)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(ds.loss.sel(process="adam").values, losses, rtol=1e-10)


class SpectralNet(eqx.Module):
    """x -> SpectralNorm(Linear) -> tanh -> Linear, on one example (4,) -> (3,), with its state."""

    first: eqx.nn.SpectralNorm
    last: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.first = eqx.nn.SpectralNorm(eqx.nn.Linear(4, 6, key=k1), "weight", key=k3)
        self.last = eqx.nn.Linear(6, 3, key=k2)

    def __call__(self, x, state):
        h, state = self.first(x, state)
        return self.last(jnp.tanh(h)), state


class Counter(eqx.Module):
    """A layer of one's own that counts its calls in its state (and adds the count): no `inference` field."""

    count: eqx.nn.StateIndex

    def __init__(self):
        self.count = eqx.nn.StateIndex(jnp.array(0.0))

    def __call__(self, x, state):
        n = state.get(self.count)
        return x + n, state.set(self.count, n + 1)


class Counted(eqx.Module):
    layers: tuple

    def __init__(self, key):
        self.layers = (eqx.nn.Linear(4, 3, key=key), Counter())

    def __call__(self, x, state):
        return self.layers[1](self.layers[0](x), state)


def spectral_by_hand(model: SpectralNet, u, v, x):
    """SpectralNet written out with sigma = u^T W v from the given (u, v), no power iteration."""
    w = model.first.layer.weight
    h = jnp.tanh(x @ (w / (u @ w @ v)).T + model.first.layer.bias)
    return h @ model.last.weight.T + model.last.bias


def test_a_layer_that_updates_its_state_is_refused_by_path_and_inference_mode_is_the_fixed_loss():
    """SpectralNorm in training mode (it advances its power iteration at every call) and a counting layer of
    one's own are SpecErrors naming the layer's path, its state and the remedy; a model holding state needs
    it. Under eqx.nn.inference_mode, silently accepted: value, gradient and an HVP equal the network
    written by hand with sigma = u^T W v from the state's (u, v), at w0 and at a moved point."""
    model, state = eqx.nn.make_with_state(SpectralNet)(jax.random.key(2))
    x, y = data()
    with pytest.raises(
        SpecError, match=r"state of model.first \(eqx.nn.SpectralNorm, state .uv_index\).*inference_mode"
    ):
        eosflow.Problem.from_equinox(model, x, y, loss="mse", state=state)
    counted, counts = eqx.nn.make_with_state(Counted)(jax.random.key(3))
    with pytest.raises(SpecError, match=r"state of model.layers\[1\] \(Counter, state .count\).*unchanged"):
        eosflow.Problem.from_equinox(counted, x, y, loss="mse", state=counts)
    with pytest.raises(SpecError, match=r"layers with state \(model.first\), which need their state"):
        eosflow.Problem.from_equinox(model, x, y, loss="mse")
    frozen = eqx.nn.inference_mode(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problem = eosflow.Problem.from_equinox(frozen, x, y, loss="mse", state=state)
        objective, unravel = problem.objective, problem.objective.unravel
        u, v = state.get(model.first.uv_index)

        def oracle(w):
            return mse(spectral_by_hand(eqx.combine(unravel(w), frozen), u, v, x), y)

        rng = np.random.default_rng(0)
        w0 = jnp.asarray(problem.w0)
        direction = jnp.asarray(rng.normal(size=w0.shape))
        moved = w0 + 0.3 * jnp.asarray(rng.normal(size=w0.shape))  # W away from the one the state was made for
        for w in (w0, moved):
            assert abs(float(objective.value(w)) - float(oracle(w))) < 1e-13
            np.testing.assert_allclose(objective.grad(w), jax.grad(oracle)(w), rtol=0, atol=1e-12)
            hvp = jax.jvp(jax.grad(oracle), (w,), (direction,))[1]
            np.testing.assert_allclose(objective.hvp(w, direction), hvp, rtol=0, atol=1e-11)
    # why training mode is refused: with the state fixed, its values and its gradient are of two functions
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def training(w):
        fresh = jax.tree_util.tree_unflatten(*reversed(jax.tree_util.tree_flatten(state)))
        return mse(jax.vmap(lambda xi: eqx.combine(unravel(w), static)(xi, fresh)[0])(x), y)

    fd = (training(moved + 1e-6 * direction) - training(moved - 1e-6 * direction)) / 2e-6
    assert abs(float(fd - jax.grad(training)(moved) @ direction)) > 1e-2 * abs(float(fd))
