"""Full-batch losses in chunks (``microbatch``): every derivative and whole runs equal the unchunked
ones (float64, sizes that divide N and sizes that leave a remainder), XLA's scratch memory falls with
the chunk, and losses that are not a mean over examples are refused."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.config import SpecError
from eosflow.experiment import prepare

N = 23


def mlp_problem(seed: int = 0, loss="mse") -> eosflow.Problem:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(N, 3)), rng.normal(size=(N, 2))
    params = [rng.normal(size=(3, 8)) / 2, rng.normal(size=8) / 4, rng.normal(size=(8, 2)) / 3, np.zeros(2)]
    return eosflow.Problem.from_model(lambda p, x: jnp.tanh(x @ p[0] + p[1]) @ p[2] + p[3], params, x, y, loss)


@eqx.filter_jit
def derivatives(o, w, u, v, block):
    return o.value(w), o.grad(w), o.hvp(w, v), o.hvp_batch(w, block), o.third_derivative(w, u, v)


@pytest.mark.parametrize(("size", "seed"), [(1, 0), (5, 1), (7, 0), (22, 1), (40, 0)])
def test_every_derivative_equals_the_unchunked_one(size, seed):
    """Value, gradient, HVP, the column-batched HVP and D^3 L[u, v] at a random point, relative 1e-13."""
    problem = mlp_problem(seed)
    chunked = problem.with_microbatch(size).objective
    whole = problem.objective
    assert chunked.microbatch == size and whole.microbatch is None
    rng = np.random.default_rng(seed + 10)
    w = jnp.asarray(problem.w0) + 0.3 * jnp.asarray(rng.normal(size=problem.w0.shape))
    u, v = (jnp.asarray(rng.normal(size=w.shape)) for _ in range(2))
    block = jnp.asarray(rng.normal(size=(w.size, 3)))
    names = ("value", "grad", "hvp", "hvp_batch", "third_derivative")
    for name, a, b in zip(names, derivatives(whole, w, u, v, block), derivatives(chunked, w, u, v, block)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-13 * float(jnp.max(jnp.abs(a))), err_msg=name)


def test_runs_equal_the_unchunked_runs():
    """GD with eigenpairs and the central flow (third derivatives) through simulate: losses and sharpness
    agree to rounding (float64); a spec's `microbatch` reaches the problem a run builds (training and test
    objectives of the digits MLP)."""
    problem = mlp_problem(2)
    settings = dict(lr=0.6, steps=40, processes=["gd", "central_flow"], spectrum={"k_max": 2})
    a = eosflow.simulate(problem, **settings)
    b = eosflow.simulate(problem, microbatch=6, **settings)
    for field in ("loss", "sharpness"):
        np.testing.assert_allclose(b[field].values, a[field].values, rtol=1e-10, err_msg=field)
    assert float(a.sharpness.sel(process="gd").max()) * 0.6 > 1.5  # the run reaches the edge: a real test

    table = {"dtype": "float64", "microbatch": 32, "problem": {"name": "mlp", "width": 8, "n_train": 100}}
    spec, built, _, _ = prepare(table)
    assert spec.microbatch == 32 and built.objective.microbatch == 32 and built.test_objective.microbatch == 32


def test_scratch_memory_falls_with_the_chunk():
    """XLA's accounting of the compiled HVP's scratch memory: at N = 1024 and chunks of 64 it is below a
    quarter of the unchunked program's (activations of one chunk instead of all examples)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1024, 16)).astype("float32"), rng.normal(size=(1024, 4)).astype("float32")
    params = [(rng.normal(size=(16, 256)) / 4).astype("float32"), (rng.normal(size=(256, 4)) / 16).astype("float32")]
    problem = eosflow.Problem.from_model(lambda p, x: jnp.tanh(x @ p[0]) @ p[1], params, x, y, "mse")

    def scratch(objective):
        with jax.enable_x64(False):
            w = jnp.asarray(problem.w0)
            program = jax.jit(lambda o, w, v: o.hvp(w, v)).lower(objective, w, w).compile()
            return program.memory_analysis().temp_size_in_bytes

    whole, chunked = scratch(problem.objective), scratch(problem.with_microbatch(64).objective)
    assert chunked < whole / 4, (whole, chunked)


class BatchNormNet(eqx.Module):
    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.first, self.norm = eqx.nn.Linear(3, 2, key=key), eqx.nn.BatchNorm(2, "batch", mode="batch")

    def __call__(self, x, state):
        return self.norm(self.first(x), state)


def test_losses_that_are_not_a_mean_over_examples_are_refused():
    with pytest.raises(SpecError, match=r"not a mean over examples.*examples 0-4 is .* of 0-1 and 2-4"):
        mlp_problem(loss=lambda f, y: jnp.sum((f - y) ** 2)).with_microbatch(5)
    model, state = eqx.nn.make_with_state(BatchNormNet)(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch_statistics = eosflow.Problem.from_equinox(
        model, rng.normal(size=(N, 3)), rng.normal(size=(N, 2)), state=state
    )
    with pytest.raises(SpecError, match="BatchNorm normalizing by the batch's statistics"):
        batch_statistics.with_microbatch(8)
    toy = eosflow.Problem.from_function(lambda w: jnp.sum(w**2), jnp.ones(3))
    with pytest.raises(SpecError, match="no examples"):
        toy.with_microbatch(2)
    with pytest.raises(SpecError, match="a number of examples >= 1"):
        mlp_problem().with_microbatch(0)
    with pytest.raises(SpecError, match="microbatch"):
        eosflow.simulate(mlp_problem(), lr=0.1, steps=2, microbatch=-1)


def test_a_torch_model_in_chunks_equals_it_whole():
    """The torch bridge's data are example indices, so chunks are torch evaluations of those rows."""
    torch = pytest.importorskip("torch")
    import eosflow.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    batch = (torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64))
    problem = eosflow.torch.problem(model, torch.nn.functional.mse_loss, batch)
    settings = dict(lr=0.3, steps=10, processes=["gd"], spectrum={"k_max": 2})
    a = eosflow.simulate(problem, **settings)
    b = eosflow.simulate(problem, microbatch=5, **settings)
    np.testing.assert_allclose(b.loss.values, a.loss.values, rtol=1e-12)
    np.testing.assert_allclose(b.sharpness.values, a.sharpness.values, rtol=1e-10)


def test_the_live_tracker_in_chunks_equals_it_whole():
    """SharpnessTracker(microbatch=B) in a user's loop: the same eigenpairs at every update (float64),
    and the same HVP count, on a batch of N = 23 split into chunks of 5 and 23 = N; a bad B is named."""
    rng = np.random.default_rng(3)
    batch = (jnp.asarray(rng.normal(size=(N, 3))), jnp.asarray(rng.normal(size=(N, 2))))
    params = {"a": jnp.asarray(rng.normal(size=(3, 8)) / 2), "b": jnp.asarray(rng.normal(size=(8, 2)) / 3)}

    def loss_fn(p, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ p["a"]) @ p["b"] - y) ** 2, axis=-1))

    trackers = [eosflow.SharpnessTracker(loss_fn, k=2, tol=1e-6, microbatch=b) for b in (None, 5, N)]
    states = [t.init(params, jax.random.key(0)) for t in trackers]
    for _ in range(4):
        results = []
        for i, tracker in enumerate(trackers):
            states[i], eig = eqx.filter_jit(tracker.update)(states[i], params, batch)
            results.append(eig)
        for eig in results[1:]:
            np.testing.assert_allclose(eig.values, results[0].values, rtol=1e-12)
            assert int(eig.hvps) == int(results[0].hvps)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, jax.grad(loss_fn)(params, batch))
    with pytest.raises(ValueError, match="microbatch must be a number of examples >= 1"):
        eosflow.SharpnessTracker(loss_fn, microbatch=0)
    # a leaf without the examples' axis (per-class weights): chunked with them, a wrong sharpness (+17%) before
    weighted = {"xy": batch, "class_weights": jnp.ones(N + 4)}
    tracker = eosflow.SharpnessTracker(lambda p, b: loss_fn(p, b["xy"]), k=1, microbatch=5)
    for state_batch in (weighted, {**weighted, "scale": jnp.asarray(2.0)}):
        with pytest.raises(SpecError, match=rf"the examples \(batch\['xy'\]\[0\] of shape \({N}, 3\): {N}\), but "):
            tracker.update(tracker.init(params, jax.random.key(0)), params, state_batch)


def test_per_example_and_minibatch_gradients_in_chunks():
    """per_example_grads (all rows, and a subset with repeats) and batch_grad with chunks equal the
    unchunked ones; an SGD run with its noise trace from per-example gradients equals its unchunked run."""
    problem = mlp_problem(4)
    whole, chunked = problem.objective, problem.with_microbatch(4).objective
    w = jnp.asarray(problem.w0)
    subset = jnp.asarray([5, 0, 5, 22, 7, 3, 9])
    gradients = eqx.filter_jit(
        lambda o: (o.per_example_grads(w), o.per_example_grads(w, subset), o.batch_grad(w, subset))
    )
    for a, b in zip(gradients(whole), gradients(chunked)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-15)
    settings = dict(
        lr=0.2,
        steps=12,
        seed=1,
        processes=["sgd"],
        options={"sgd": {"batch_size": 10, "noise_every": 4}},
        spectrum={"every": 0},
    )
    a, b = eosflow.simulate(problem, **settings), eosflow.simulate(problem, microbatch=3, **settings)
    for field in ("loss", "batch_loss", "noise_trace"):
        assert np.isfinite(a[field].values).any(), field
        np.testing.assert_allclose(b[field].values, a[field].values, rtol=1e-11, err_msg=field)


@pytest.mark.parametrize("masked", [[9, 10, 11], [16], list(range(0, N, 3))])
def test_a_mean_over_unmasked_examples_is_refused_wherever_the_mask_falls(masked):
    """A loss averaged over the examples a mask keeps (labels ignored by cross-entropy, padding) is not a mean over
    examples, wherever the masked rows are (rows 0-3 were all that was checked); the unmasked loss is accepted.
    Each refusal is checked against the exact chunked loss: the two differ."""
    rng = np.random.default_rng(len(masked))
    x, y = rng.normal(size=(N, 3)), rng.normal(size=(N, 2))
    keep = np.ones(N)
    keep[masked] = 0.0
    params = [rng.normal(size=(3, 2)), np.zeros(2)]

    def masked_mean(f, target):
        squared, weight = jnp.sum((f - target[:, :2]) ** 2, axis=1), target[:, 2]
        return jnp.sum(weight * squared) / jnp.sum(weight)

    targets = np.column_stack([y, keep])
    problem = eosflow.Problem.from_model(lambda p, x: jnp.tanh(x @ p[0] + p[1]), params, x, targets, masked_mean)
    for size in (1, 5, 7, 10):
        chunked = sum(
            (min(a + size, N) - a)
            / N
            * float(problem.objective.loss_on(problem.w0, (x[a : a + size], targets[a : a + size])))
            for a in range(0, N, size)
        )
        differs = not abs(chunked - float(problem.objective.value(problem.w0))) <= 1e-6  # NaN: a chunk of no weight
        if differs:
            with pytest.raises(SpecError, match=f"`microbatch` = {size} .*not a mean over examples.*unmasked"):
                problem.with_microbatch(size)
        else:  # every chunk happens to hold the same share of masked rows: chunking is exact
            problem.with_microbatch(size)
    plain = eosflow.Problem.from_model(lambda p, x: jnp.tanh(x @ p[0] + p[1]), params, x, y, "mse")
    for size in (1, 5, 7, 10):
        plain.with_microbatch(size)


def test_the_torch_tracker_in_chunks_equals_it_whole():
    """eosflow.torch.SharpnessTracker(microbatch=B) inside a torch loop: the same eigenvalues (1e-12) and
    HVP counts as the unchunked tracker at every update; a summed loss and a bad B are refused."""
    torch = pytest.importorskip("torch")
    import eosflow.torch

    F = torch.nn.functional
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    batch = (torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64))
    trackers = [eosflow.torch.SharpnessTracker(model, F.mse_loss, k=2, tol=1e-8, microbatch=b) for b in (None, 5, 7)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        whole, *chunked = (tracker.update(batch) for tracker in trackers)
        for eig in chunked:
            np.testing.assert_allclose(eig.values, whole.values, rtol=1e-12)
            assert eig.hvps == whole.hvps
        optimizer.zero_grad()
        F.mse_loss(model(batch[0]), batch[1]).backward()
        optimizer.step()
    summed = eosflow.torch.SharpnessTracker(model, lambda f, t: F.mse_loss(f, t, reduction="sum"), microbatch=5)
    with pytest.raises(ValueError, match="not a mean over examples"):
        summed.update(batch)
    labels = torch.randint(0, 2, (N,))
    labels[10:16] = -100  # ignored by cross-entropy, which averages over the rest: rows 0-3 look like a mean
    for size in (1, 5, 7):
        with pytest.raises(ValueError, match="not a mean over examples.*labels ignored by cross-entropy"):
            eosflow.torch.SharpnessTracker(model, F.cross_entropy, microbatch=size).update((batch[0], labels))
        with pytest.raises(ValueError, match="not a mean over examples"):
            eosflow.torch.hessian_operator(model, F.cross_entropy, (batch[0], labels), microbatch=size)
    with pytest.raises(ValueError, match="microbatch must be a number of examples >= 1"):
        eosflow.torch.SharpnessTracker(model, F.mse_loss, microbatch=0)


def test_the_examples_sgd_samples_are_the_axis_every_leaf_shares():
    """Objective.num_examples read N off the first leaf: a batch that starts with a constant of 3 entries gave
    N = 3 to SGD's sampling. It is now the shared axis, and a leaf without it is named (as microbatch names it)."""
    import jax.numpy as jnp

    from eosflow.config import SpecError
    from eosflow.objective import Objective

    x, y = jnp.ones((10, 2)), jnp.ones((10,))
    loss = Objective.from_function(lambda w: jnp.sum(w**2)).loss_on
    assert Objective(loss_on=loss, data={"a": y, "x": x}, unravel=lambda w: w).num_examples == 10
    constants = {"a": jnp.ones(3), "x": x, "y": y}
    with pytest.raises(SpecError, match=r"batch\['a'\] of shape \(3,\) has no axis of 10"):
        Objective(loss_on=loss, data=constants, unravel=lambda w: w).num_examples  # noqa: B018
