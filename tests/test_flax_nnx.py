"""A Flax NNX module in eosflow: measured over its nnx.Param variables, as nnx.grad differentiates them, with
BatchNorm statistics, RNG state and counters held fixed and the user's module left as it was.

Oracles: dense eigh of the float64 Hessian over jax.flatten_util's flattening of the Param state (the loss on
the module merged back with NNX's own split/merge), the preconditioner computed from Adam's nu by hand, and a
hand-written NNX training loop (nnx.value_and_grad + nnx.Optimizer)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx")

import eosflow  # noqa: E402
from eosflow import optimizer_edges  # noqa: E402
from eosflow.precision import precision  # noqa: E402

# flax's BatchNorm keeps float32 running statistics whatever its dtype, and writing float64 batch statistics
# into them warns in JAX 0.10: the test model's own forward, the same in the hand-written loops.
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")


class Net(nnx.Module):
    """Linear -> BatchNorm (training mode: the batch's statistics) -> tanh -> Dropout -> Linear, and a counter."""

    def __init__(self, n_in: int, width: int, n_out: int, rate: float, seed: int):
        rngs = nnx.Rngs(seed)
        self.first = nnx.Linear(n_in, width, rngs=rngs, param_dtype=jnp.float64)
        self.norm = nnx.BatchNorm(width, rngs=rngs, param_dtype=jnp.float64, dtype=jnp.float64)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.last = nnx.Linear(width, n_out, rngs=rngs, param_dtype=jnp.float64)
        self.calls = nnx.Variable(jnp.array(0, jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1  # a forward that writes state, as BatchNorm's running statistics do
        return self.last(self.drop(jnp.tanh(self.norm(self.first(x)))))


def mse(model, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((model(x) - y) ** 2, axis=-1))


def setup(seed, rate=0.25):
    rng = np.random.default_rng(seed)
    n_in, width, n = int(rng.integers(3, 6)), int(rng.integers(4, 9)), int(rng.integers(20, 40))
    model = Net(n_in, width, 2, rate, seed)
    batch = (jnp.asarray(rng.normal(size=(n, n_in))), jnp.asarray(rng.normal(size=(n, 2))))
    return model, batch


def dense_hessian(model, loss, batch):
    """The float64 Hessian of loss(model, batch) over the model's nnx.Param leaves, the rest held as they are."""
    from jax.flatten_util import ravel_pytree

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat, unflatten = ravel_pytree(params)

    def on_flat(w):
        return loss(nnx.merge(graphdef, unflatten(w), jax.tree.map(lambda leaf: leaf, rest)), batch)

    return np.asarray(jax.jit(jax.hessian(on_flat))(flat)), flat.size  # one program, not op by op


def snapshot(model):
    """Every leaf of the module's whole state (keys as their data) as NumPy arrays."""

    def data(leaf):
        return jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf

    return [np.array(data(leaf)) for leaf in jax.tree.leaves(nnx.state(model))]


def top(matrix, k):
    return np.linalg.eigvalsh(0.5 * (matrix + matrix.T))[::-1][:k]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_nnx_module_is_measured_over_its_params_and_left_unchanged(seed):
    """tracker.update(state, model, batch) under nnx.jit (which writes a module's changes back): the top 2 equal
    dense eigh over the Param flattening to 1e-9, in that vector order; the module's state (BatchNorm
    statistics, RNG counts, the counter) is bitwise unchanged; with P = Adam's preconditioner read from an
    nnx.Optimizer's state the pairs are those of P^-1/2 H P^-1/2; HessianOperator is the dense Hessian."""
    with precision("float64"):
        model, batch = setup(seed)
        dense, size = dense_hessian(model, mse, batch)
        tracker = eosflow.SharpnessTracker(mse, k=2, tol=1e-9, max_iters=200)
        state = tracker.init(model, jax.random.key(seed))
        before = snapshot(model)

        @nnx.jit
        def measure(state, model, batch, preconditioner=None):
            return tracker.update(state, model, batch, preconditioner)

        state, pairs = measure(state, model, batch)
        assert pairs.vectors.shape == (size, 2)
        np.testing.assert_allclose(pairs.values, top(dense, 2), rtol=1e-9)
        for value, vector in zip(pairs.values, np.asarray(pairs.vectors).T):
            np.testing.assert_allclose(dense @ vector, value * vector, atol=1e-7 * abs(float(value)))
        after = snapshot(model)
        assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(before, after))

        b2, eps = 0.99, 1e-3
        edge = optimizer_edges.adam(1e-2, b2=b2, eps=eps)
        optimizer = nnx.Optimizer(model, edge.transform, wrt=nnx.Param)
        for _ in range(3):
            optimizer.update(model, nnx.grad(mse)(model, batch))
        dense, _ = dense_hessian(model, mse, batch)
        adam_state = optimizer_edges.substate(optimizer.opt_state, lambda s: isinstance(s, optax.ScaleByAdamState))
        nu = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(adam_state.nu)])
        p = np.sqrt(nu / (1 - b2**3)) + eps  # optax's P after 3 updates, by hand
        scaled = dense / np.sqrt(p)[:, None] / np.sqrt(p)[None, :]
        _, pairs = measure(state, model, batch, edge.preconditioner(optimizer.opt_state))
        np.testing.assert_allclose(pairs.values, top(scaled, 2), rtol=1e-9)

        operator = eosflow.HessianOperator.from_function(mse, model, batch)
        np.testing.assert_allclose(operator @ np.eye(size), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lr", [0.05, 0.3])
def test_gd_on_an_nnx_module_is_the_nnx_training_loop(lr):
    """Problem.from_model(lambda m, x: m(x), model, x, y) and Problem.from_function(loss, model): GD's losses
    equal a hand-written NNX loop (nnx.value_and_grad, nnx.Optimizer(optax.sgd)) to 1e-12 over 25 steps, and
    the sharpness at step 0 is dense eigh's."""
    with precision("float64"):
        model, (x, y) = setup(3, rate=0.0)
        dense, _ = dense_hessian(model, mse, (x, y))
        for problem in (
            eosflow.Problem.from_model(lambda m, inputs: m(inputs), model, x, y, loss="mse"),
            eosflow.Problem.from_function(lambda m: mse(m, (x, y)), model),
        ):
            ds = eosflow.simulate(problem, lr=lr, steps=25, processes=["gd"], spectrum={"k_max": 1, "tol": 1e-9})
            own, _ = setup(3, rate=0.0)  # the same module, built again
            optimizer = nnx.Optimizer(own, optax.sgd(lr), wrt=nnx.Param)
            losses = []
            for _ in range(25):
                loss, grads = nnx.value_and_grad(mse)(own, (x, y))
                losses.append(float(loss))
                optimizer.update(own, grads)
            np.testing.assert_allclose(ds.loss.sel(process="gd").values[:25], losses, rtol=1e-12)
            np.testing.assert_allclose(float(ds.sharpness.sel(process="gd")[0]), top(dense, 1)[0], rtol=1e-9)


def test_a_dropout_in_training_mode_is_named():
    """A Problem of an NNX module with a Dropout in training mode warns, naming the layer's path (its mask is
    drawn once from the fixed RNG state); the same module after model.eval() does not."""
    with precision("float64"):
        model, (x, y) = setup(4, rate=0.3)
        with pytest.warns(UserWarning, match=r"model\.drop is an nnx\.Dropout in training mode"):
            eosflow.Problem.from_model(lambda m, inputs: m(inputs), model, x, y)
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eosflow.Problem.from_model(lambda m, inputs: m(inputs), model, x, y)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_an_nnx_training_runs_state_starts_eosflows_optimizer(optimizer):
    """Checkpoint(model, nnx.Optimizer.opt_state) after 4 steps of the user's NNX loop (its moments are
    OptVariables where the parameters are Params): eosflow's optimizer continues the user's loop to 1e-12
    over 8 more steps, given the module or its Param state; moments of other shapes are refused by name."""
    from eosflow.anchored import anchored
    from eosflow.checkpoint import Checkpoint
    from eosflow.config import SpecError

    with precision("float64"):
        model, (x, y) = setup(5, rate=0.0)
        problem = eosflow.Problem.from_model(lambda m, inputs: m(inputs), model, x, y, loss="mse")
        lr = 0.02
        if optimizer == "adam":
            transform, table = (
                optax.adam(lr),
                {"processes": ["adam", "adam_stable_flow"], "adam": {"beta1": 0.9, "beta2": 0.999}},
            )
        else:
            transform = optax.sgd(lr, momentum=0.9)
            table = {"processes": ["momentum", "momentum_stable_flow"], "momentum": {"beta": 0.9, "form": "classical"}}
        table = {**table, "lr": lr, "steps": 12, "dtype": "float64"}
        own = nnx.Optimizer(model, transform, wrt=nnx.Param)
        for _ in range(4):
            own.update(model, nnx.grad(mse)(model, (x, y)))
        # NNX changes the module and the optimizer's state in place: keep copies to start from
        moments = jax.tree.map(lambda leaf: leaf, own.opt_state)
        starts = [
            Checkpoint(nnx.clone(model), moments),
            Checkpoint(jax.tree.map(lambda a: a, nnx.state(model, nnx.Param)), moments),
        ]
        losses = []
        for _ in range(8):
            losses.append(float(mse(model, (x, y))))
            own.update(model, nnx.grad(mse)(model, (x, y)))
        for start in starts:
            ds = anchored(table, at=2, problem=problem, start=start)
            np.testing.assert_allclose(ds.loss.sel(process=table["processes"][0]).values[:6], losses[2:], rtol=1e-12)

        other = nnx.Optimizer(setup(6, rate=0.0)[0], transform, wrt=nnx.Param)  # another network's moments
        with pytest.raises(
            SpecError,
            match=r"opt_state\.(mu|trace): its pytree structure is not the problem's parameters' \(leaf "
            r"\['first'\]\['bias'\]\.value of shape \(6,\) where the parameters have \['first'\]\['bias'\]\.value of "
            r"shape \(8,\)",
        ):
            anchored(table, at=2, problem=problem, start=Checkpoint(model, other.opt_state))


def test_batchnorm_in_training_mode_refuses_a_batch_of_one_example():
    """Per-example gradients and batch_size = 1 would normalize one example by its own statistics: refused,
    naming the layer's path, for a from_model problem of an NNX module with BatchNorm in training mode;
    minibatches of two examples and the module after model.eval() run, and eval's per-example gradients sum
    to the full gradient's mean."""
    with precision("float64"):
        model, (x, y) = setup(7, rate=0.0)
        problem = eosflow.Problem.from_model(lambda m, inputs: m(inputs), model, x, y, loss="mse")
        w = jnp.asarray(problem.w0)
        with pytest.raises(ValueError, match=r"BatchNorm layers in training mode \(model\.norm\).*one example"):
            problem.objective.per_example_grads(w)
        with pytest.raises(ValueError, match=r"batch_size = 1"):
            eosflow.simulate(problem, lr=0.1, steps=2, processes=["sgd"], options={"sgd": {"batch_size": 1}})
        ds = eosflow.simulate(problem, lr=0.1, steps=2, processes=["sgd"], options={"sgd": {"batch_size": 2}})
        assert np.isfinite(ds.loss.values).all()
        model.eval()
        evaluated = eosflow.Problem.from_model(lambda m, inputs: m(inputs), model, x, y, loss="mse")
        rows = evaluated.objective.per_example_grads(w)
        np.testing.assert_allclose(np.mean(rows, axis=0), evaluated.objective.grad(w), rtol=1e-10, atol=1e-14)


def test_batch_sharpness_of_an_nnx_module_is_that_of_its_params():
    """eosflow.batch_sharpness on the module (BatchNorm in training mode, each batch its own statistics) equals
    the same estimate on its Param state with the loss merging it back, and every batch's curvature equals
    g^T H g from dense jax.hessian over the Param flattening; the module is left unchanged."""
    from jax.flatten_util import ravel_pytree

    with precision("float64"):
        model, (x, y) = setup(8, rate=0.0)
        batches = (x[:24].reshape(4, 6, -1), y[:24].reshape(4, 6, -1))
        before = snapshot(model)
        value, quotients = eosflow.batch_sharpness.batch_sharpness(mse, model, batches)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        flat, unflatten = ravel_pytree(params)

        def loss(w, batch):
            return mse(nnx.merge(graphdef, unflatten(w), jax.tree.map(lambda leaf: leaf, rest)), batch)

        grad, hessian = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))  # one program each, not op by op
        curvatures = []
        for i in range(4):
            batch = (batches[0][i], batches[1][i])
            g = np.asarray(grad(flat, batch))
            curvatures.append(g @ np.asarray(hessian(flat, batch)) @ g)
        np.testing.assert_allclose(quotients.curvature, curvatures, rtol=1e-9)
        assert float(value) == pytest.approx(float(np.mean(quotients.curvature / quotients.descent)), rel=1e-12)
        after = snapshot(model)
        assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_monitored_inside_an_nnx_optimizer_measures_a_state_loss_and_names_the_way_for_a_module_loss():
    """optax's wrapper inside nnx.Optimizer gets the Params as an nnx.State. A loss over that State (merged
    back by the user) is measured: Adam's preconditioned sharpness equals dense eigh of P^-1/2 H P^-1/2 with
    P from the optimizer's nu by hand, every step. A module's loss fails there with a TypeError that names the
    State and the tracker loop that works."""
    from eosflow.monitor import monitored

    with precision("float64"):
        model, batch = setup(9, rate=0.0)
        model.eval()  # BatchNorm on its running statistics: the module is a function of its Params alone
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def state_loss(params, batch):
            return mse(nnx.merge(graphdef, params, jax.tree.map(lambda leaf: leaf, rest)), batch)

        lr, b2 = 0.05, 0.99
        readings = []
        opt = nnx.Optimizer(
            model, monitored(optimizer_edges.adam(lr, b2=b2), state_loss, every=1, log=readings.append), wrt=nnx.Param
        )
        for _ in range(3):
            hessian, _ = dense_hessian(model, mse, batch)
            opt.update(model, nnx.grad(mse)(model, batch), batch=batch)
            adam_state = optimizer_edges.substate(opt.opt_state, lambda s: isinstance(s, optax.ScaleByAdamState))
            nu = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(nnx.as_pure(adam_state.nu))])
            p = np.sqrt(nu / (1 - b2 ** int(adam_state.count[...]))) + 1e-8
            expected = top(hessian / np.sqrt(np.outer(p, p)), 1)[0]
            jax.effects_barrier()
            np.testing.assert_allclose(float(readings[-1].sharpness), expected, rtol=1e-6)
        assert len(readings) == 3

        wrapped = nnx.Optimizer(model, monitored(optimizer_edges.adam(lr), mse, every=1, log=None), wrt=nnx.Param)
        with pytest.raises(TypeError, match=r"passes the Params as an nnx\.State.*eosflow\.SharpnessTracker"):
            wrapped.update(model, nnx.grad(mse)(model, batch), batch=batch)


class LoRANet(nnx.Module):
    """A base Linear adapted by LoRA (rank 2), tanh, a head: a fine-tuning run trains the LoRAParams only."""

    def __init__(self, n_in: int, width: int, seed: int):
        rngs = nnx.Rngs(seed)
        base = nnx.Linear(n_in, width, rngs=rngs, param_dtype=jnp.float64)
        self.adapted = nnx.LoRA(n_in, 2, width, base_module=base, rngs=rngs, param_dtype=jnp.float64)
        self.head = nnx.Linear(width, 2, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.head(jnp.tanh(self.adapted(x)))


@pytest.mark.parametrize("seed", [0, 1])
def test_wrt_measures_the_part_an_nnx_optimizer_trains(seed):
    """nnx.Optimizer(..., wrt=nnx.LoRAParam) after 6 Adam steps: the tracker with wrt=nnx.LoRAParam and that
    optimizer's P equals dense eigh of P^-1/2 H P^-1/2 over the LoRA flattening (the base weights and head held
    fixed) with P from nu by hand; HessianOperator, batch sharpness and Problem.from_model take the same part;
    a filter that selects nothing is named."""
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(seed)
    with precision("float64"):
        n_in, width = int(rng.integers(3, 6)), int(rng.integers(4, 7))
        model = LoRANet(n_in, width, seed)
        batch = (jnp.asarray(rng.normal(size=(24, n_in))), jnp.asarray(rng.normal(size=(24, 2))))
        adam = optimizer_edges.adam(0.05, b2=0.99)
        opt = nnx.Optimizer(model, adam.transform, wrt=nnx.LoRAParam)
        for _ in range(6):
            opt.update(model, nnx.grad(mse, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch))
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        flat, unflatten = ravel_pytree(lora)

        def on_flat(w):
            return mse(nnx.merge(graphdef, unflatten(w), jax.tree.map(lambda leaf: leaf, rest)), batch)

        hessian = np.asarray(jax.jit(jax.hessian(on_flat))(flat))
        nu = optimizer_edges.substate(opt.opt_state, lambda s: isinstance(s, optax.ScaleByAdamState)).nu
        p = np.sqrt(np.asarray(ravel_pytree(nnx.as_pure(nu))[0]) / (1 - 0.99**6)) + 1e-8
        tracker = eosflow.SharpnessTracker(mse, k=2, tol=1e-9, max_iters=200, wrt=nnx.LoRAParam)
        state = tracker.init(model, jax.random.key(seed))
        _, eig = nnx.jit(tracker.update)(state, model, batch, adam.preconditioner(opt.opt_state))
        np.testing.assert_allclose(eig.values, top(hessian / np.sqrt(np.outer(p, p)), 2), rtol=1e-8)

        operator = eosflow.HessianOperator.from_function(mse, model, batch, wrt=nnx.LoRAParam)
        np.testing.assert_allclose(operator @ np.eye(flat.size), hessian, rtol=1e-10, atol=1e-12)
        value, quotients = eosflow.batch_sharpness.batch_sharpness(mse, model, [batch], wrt=nnx.LoRAParam)
        g = np.asarray(jax.grad(on_flat)(flat))
        assert float(value) == pytest.approx(g @ hessian @ g / (g @ g), rel=1e-10)
        problem = eosflow.Problem.from_model(lambda m, x: m(x), model, *batch, loss="mse", wrt=nnx.LoRAParam)
        np.testing.assert_array_equal(problem.w0, flat)
        np.testing.assert_allclose(
            problem.objective.hvp(jnp.asarray(flat), jnp.eye(flat.size)[0]), hessian[0], rtol=1e-10
        )
        with pytest.raises(ValueError, match="selects no array"):
            eosflow.SharpnessTracker(mse, k=1, wrt=nnx.BatchStat).init(model, jax.random.key(0))


def test_a_lora_runs_state_starts_eosflows_adam_on_the_lora_problem():
    """A problem over the LoRA part (wrt=nnx.LoRAParam) and a Checkpoint of that part's state with the LoRA
    nnx.Optimizer's state after 4 steps: eosflow's Adam continues the user's loop to 1e-12 over 6 steps."""
    from eosflow.anchored import anchored
    from eosflow.checkpoint import Checkpoint

    rng = np.random.default_rng(3)
    with precision("float64"):
        model = LoRANet(4, 6, 3)
        batch = (jnp.asarray(rng.normal(size=(20, 4))), jnp.asarray(rng.normal(size=(20, 2))))
        problem = eosflow.Problem.from_model(lambda m, x: m(x), model, *batch, loss="mse", wrt=nnx.LoRAParam)
        own = nnx.Optimizer(model, optax.adam(0.02), wrt=nnx.LoRAParam)
        lora_grad = nnx.grad(mse, argnums=nnx.DiffState(0, nnx.LoRAParam))
        for _ in range(4):
            own.update(model, lora_grad(model, batch))
        copy = lambda tree: jax.tree.map(lambda leaf: leaf, tree)  # noqa: E731  (NNX updates in place)
        start = Checkpoint(copy(nnx.state(model, nnx.LoRAParam)), copy(own.opt_state))
        losses = []
        for _ in range(8):
            losses.append(float(mse(model, batch)))
            own.update(model, lora_grad(model, batch))
        table = {"processes": ["adam", "adam_stable_flow"], "adam": {"beta1": 0.9, "beta2": 0.999}, "lr": 0.02}
        ds = anchored({**table, "steps": 12, "dtype": "float64"}, at=2, problem=problem, start=start)
        np.testing.assert_allclose(ds.loss.sel(process="adam").values[:6], losses[2:], rtol=1e-12)


def test_the_preconditioner_is_read_inside_nnx_jit_as_the_docs_loop_does():
    """docs/monitor.md's NNX loop reads adam.preconditioner(optimizer.opt_state) inside nnx.jit, where the
    count is an nnx Variable wrapping a tracer: ConcretizationTypeError (the doc's example and its benchmark
    failed as written, from an audit). Inside equals outside."""
    rng = np.random.default_rng(0)
    model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), jnp.tanh, nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    batch = (jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.normal(size=(16, 2)), jnp.float32))
    adam = optimizer_edges.adam(1e-2)
    optimizer = nnx.Optimizer(model, adam.transform, wrt=nnx.Param)
    for _ in range(3):
        optimizer.update(model, nnx.grad(mse)(model, batch))
    tracker = eosflow.SharpnessTracker(mse, k=1, tol=1e-4, max_iters=200)
    state = tracker.init(model, jax.random.key(0))

    @nnx.jit
    def inside(state, model, optimizer, batch):
        return tracker.update(state, model, batch, preconditioner=adam.preconditioner(optimizer.opt_state))[1]

    outside = tracker.update(state, model, batch, preconditioner=adam.preconditioner(optimizer.opt_state))[1]
    np.testing.assert_allclose(inside(state, model, optimizer, batch).values, outside.values, rtol=1e-5)
