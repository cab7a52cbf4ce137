"""Minibatch processes on a torch model: SGD and the Langevin model through eosflow.torch.problem
against the same network written in JAX (Problem.from_model, same weights, data and seed) and
against torch.optim.SGD fed the same minibatches; per-example gradients against a torch loop."""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import eosflow  # noqa: E402
import eosflow.torch  # noqa: E402
from eosflow.config import SpecWarning  # noqa: E402
from eosflow.load import load_params  # noqa: E402
from eosflow.optim.sgd import sample_batch  # noqa: E402
from eosflow.process import process_key  # noqa: E402
from eosflow.torch import TorchObjective, to_jax  # noqa: E402

F = torch.nn.functional
torch.set_num_threads(1)  # (see tests/test_torch.py)
N, SEED = 40, 3


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def data():
    rng = np.random.default_rng(1)
    return torch.tensor(rng.normal(size=(N, 2))), torch.tensor(rng.normal(size=(N, 3)))


def twin(model: torch.nn.Module, batch) -> eosflow.Problem:
    """The same network in JAX: params in torch's layout (so the flat w is the same), F.mse_loss's mean."""
    params = [p.detach().numpy().copy() for p in model.parameters()]

    def apply(p, x):
        w1, b1, w2, b2 = p
        return jnp.tanh(x @ w1.T + b1) @ w2.T + b2

    inputs, targets = (t.numpy() for t in batch)
    return eosflow.Problem.from_model(apply, params, inputs, targets, loss=lambda f, y: jnp.mean((f - y) ** 2))


def minibatch(key, step: int, sampling: str, n: int = N, size: int = 8) -> torch.Tensor:
    """The examples of step ``step``, drawn as a float64 run draws them (x64: randint's integers are 64-bit)."""
    with jax.enable_x64(True):
        return torch.from_numpy(np.array(sample_batch(key, jnp.asarray(step), n, size, sampling)))


def torch_grads(model: torch.nn.Module, inputs, targets) -> np.ndarray:
    loss = F.mse_loss(model(inputs), targets)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).numpy()


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement", "shuffle"])
def test_sgd_on_a_torch_mlp_equals_its_jax_twin_and_torch_sgd(sampling, tmp_path):
    """30 SGD steps (batch 8, momentum, weight decay, the noise trace every 10 steps): the torch problem's
    iterates, full and minibatch losses equal the JAX twin's and a torch.optim.SGD loop fed the batches
    of sample_batch; no SpecWarning (before, a torch problem had no data: full-batch GD, warned)."""
    model, batch = mlp(), data()
    problem = eosflow.torch.problem(model, F.mse_loss, batch)
    assert problem.info["n_train"] == N and problem.objective.num_examples == N
    sgd = {"batch_size": 8, "sampling": sampling, "momentum": 0.5, "weight_decay": 0.01, "noise_every": 10}
    settings = dict(lr=0.3, steps=30, seed=SEED, processes=["sgd"], options={"sgd": sgd}, spectrum={"every": 0}) | {
        "record": {"params_every": 1}
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        ours = eosflow.simulate(problem, out=tmp_path / "torch", **settings)
    reference = eosflow.simulate(twin(model, batch), out=tmp_path / "jax", **settings)
    for field in ("loss", "batch_loss", "grad_norm", "noise_trace"):
        a, b = (ds[field].sel(process="sgd").values for ds in (ours, reference))
        assert np.isfinite(b[::10]).all()
        np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=field)
    steps, positions = load_params(tmp_path / "torch", "sgd")
    assert list(steps) == list(range(30))
    np.testing.assert_allclose(positions, load_params(tmp_path / "jax", "sgd")[1], rtol=0, atol=1e-10)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5, weight_decay=0.01)
    key, inputs, targets = process_key(SEED, "sgd/minibatches"), *batch
    for step in range(30):
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        np.testing.assert_allclose(positions[step], w, rtol=0, atol=1e-10, err_msg=f"step {step}")
        rows = minibatch(key, step, sampling)
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs[rows]), targets[rows])
        assert abs(loss.item() - ours.batch_loss.sel(process="sgd").values[step]) < 1e-10
        loss.backward()
        optimizer.step()
    assert not np.allclose(positions[-1], positions[0])


def test_per_example_gradients_equal_a_torch_loop():
    """per_example_grads (all examples, a subset with repeats) and batch_grad of the bridged objective
    equal torch.autograd.grad example by example; the full batch is the stored one (bitwise L)."""
    model, (inputs, targets) = mlp(), data()
    with jax.enable_x64(True):
        objective, w0 = to_jax(TorchObjective(model, F.mse_loss, (inputs, targets)))
        w = jnp.asarray(w0)
        rows = [torch_grads(model, inputs[i : i + 1], targets[i : i + 1]) for i in range(N)]
        loop = np.stack(rows)
        np.testing.assert_allclose(objective.per_example_grads(w), loop, rtol=0, atol=1e-12 * np.abs(loop).max())
        subset = jnp.asarray([5, 0, 5, 39])
        np.testing.assert_allclose(objective.per_example_grads(w, subset), loop[[5, 0, 5, 39]], rtol=0, atol=1e-15)
        minibatch = torch_grads(model, inputs[[5, 0, 5, 39]], targets[[5, 0, 5, 39]])
        np.testing.assert_allclose(objective.batch_grad(w, subset), minibatch, rtol=0, atol=1e-15)
        assert float(objective.value(w)) == F.mse_loss(model(inputs), targets).item()


def test_langevin_on_a_torch_mlp_equals_its_jax_twin(tmp_path):
    """The Langevin model of SGD, whose noise is built from per-example gradients at every substep,
    follows the same path on the torch problem and its JAX twin (same seed: the same noise draws)."""
    model, batch = mlp(), data()
    settings = dict(
        lr=0.2,
        steps=6,
        seed=SEED,
        processes=["langevin"],
        options={"langevin": {"batch_size": 4, "substeps": 2}},
        spectrum={"every": 0},
        record={"params_every": 1},
    )
    ours = eosflow.simulate(eosflow.torch.problem(model, F.mse_loss, batch), out=tmp_path / "torch", **settings)
    reference = eosflow.simulate(twin(model, batch), out=tmp_path / "jax", **settings)
    for field in ("loss", "velocity_norm_sq"):
        a, b = (ds[field].sel(process="langevin").values for ds in (ours, reference))
        np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=field)
    a, b = (load_params(tmp_path / name, "langevin")[1] for name in ("torch", "jax"))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    assert np.linalg.norm(b[-1] - b[0]) > 1e-3  # it moved


def test_batchnorm_sgd_uses_each_minibatchs_statistics_and_refuses_single_examples():
    """BatchNorm in train mode: SGD's minibatch losses are the minibatch-statistics losses a torch loop
    in train mode computes (on a copy); per-example gradients (one example's statistics) are refused."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    batch = data()
    problem = eosflow.torch.problem(model, F.mse_loss, batch)
    sgd = {"batch_size": 8, "sampling": "shuffle"}
    ds = eosflow.simulate(problem, lr=0.2, steps=6, seed=SEED, options={"sgd": sgd}, processes=["sgd"])
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)
    key, losses = process_key(SEED, "sgd/minibatches"), []
    for step in range(6):
        rows = minibatch(key, step, "shuffle")
        optimizer.zero_grad()
        loss = F.mse_loss(reference(batch[0][rows]), batch[1][rows])
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    np.testing.assert_allclose(ds.batch_loss.sel(process="sgd").values, losses, rtol=1e-12)
    with jax.enable_x64(True), pytest.raises(ValueError, match=r"BatchNorm layers in train mode \(1\).*one example"):
        problem.objective.per_example_grads(jnp.asarray(problem.w0))


def test_a_batch_without_a_shared_example_axis_has_no_examples():
    """Tensors whose leading sizes differ (e.g. a sequence-first input) have no rows to sample: the
    objective is L(w) alone, and sgd on it says it is full-batch GD."""
    model = torch.nn.Linear(2, 1).double()
    loss_fn = lambda out, y: F.mse_loss(out.mean(0), y)  # noqa: E731
    batch = (torch.ones(5, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    problem = eosflow.torch.problem(model, loss_fn, batch)
    assert problem.objective.data is None and "n_train" not in problem.info
    with pytest.warns(SpecWarning, match="full-batch GD"):
        eosflow.simulate(problem, lr=0.1, steps=1, processes=["sgd"], spectrum={"every": 0})


# ---- sequence-first batches: the example axis is not the leading one --------------------------------
T, N_SEQ = 4, 12  # steps, sequences


class SequenceModel(torch.nn.Module):
    """nn.LSTM(2, 3) (or, not ``recurrent``, a running sum over time of tanh(A x_t + b), which
    torch.func.vmap can batch) and a linear head, read on the last step (logits (N, 2)) or on every
    step (outputs (T, N)), in the layout ``batch_first`` says."""

    def __init__(self, per_step: bool, batch_first: bool = False, recurrent: bool = True):
        super().__init__()
        self.rnn = torch.nn.LSTM(2, 3, batch_first=batch_first) if recurrent else torch.nn.Linear(2, 3)
        self.head = torch.nn.Linear(3, 1 if per_step else 2)
        self.per_step, self.time, self.recurrent = per_step, 1 if batch_first else 0, recurrent

    def forward(self, x):
        out = self.rnn(x)[0] if self.recurrent else torch.tanh(self.rnn(x)).cumsum(self.time)
        return self.head(out).squeeze(-1) if self.per_step else self.head(out.select(self.time, -1))


def sequence_task(layout: str, recurrent: bool = True):
    """A float64 model and its sequence-first batch: "last", inputs (T, N, 2) with class labels (N,) under
    cross-entropy, example_axis (1, 0); "per_step", targets (T, N) under the squared loss, example_axis 1."""
    torch.manual_seed(4)
    per_step = layout == "per_step"
    model = SequenceModel(per_step, recurrent=recurrent).double()
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(T, N_SEQ, 2)))
    if per_step:
        return model, F.mse_loss, (x, torch.tensor(rng.normal(size=(T, N_SEQ)))), 1
    return model, F.cross_entropy, (x, torch.tensor(rng.integers(0, 2, size=N_SEQ))), (1, 0)


def along(batch, axes, rows):
    """The examples ``rows`` of a batch, written out per tensor: x[:, rows] for axis 1, y[rows] for axis 0."""
    axes = axes if isinstance(axes, tuple) else (axes,) * len(batch)
    return tuple(t.index_select(axis, rows) for t, axis in zip(batch, axes))


@pytest.mark.parametrize("batch_size", [3, 5])
@pytest.mark.parametrize("layout", ["last", "per_step"])
def test_sgd_on_a_sequence_first_lstm_equals_torch_sgd(layout, batch_size, tmp_path):
    """nn.LSTM at its default batch_first=False, examples along axis 1: 8 SGD steps (momentum) of the torch
    problem equal a torch.optim.SGD loop fed x[:, rows] and y[rows] (y[:, rows]), iterate by iterate."""
    model, loss_fn, batch, axes = sequence_task(layout)
    problem = eosflow.torch.problem(model, loss_fn, batch, example_axis=axes)
    assert problem.info["n_train"] == N_SEQ and problem.info["example_axes"] == ([1, 0] if axes == (1, 0) else [1, 1])
    sgd = {"batch_size": batch_size, "momentum": 0.5}
    ds = eosflow.simulate(
        problem,
        lr=0.5,
        steps=8,
        seed=SEED,
        processes=["sgd"],
        options={"sgd": sgd},
        spectrum={"every": 0},
        record={"params_every": 1},
        out=tmp_path,
    )
    positions = load_params(tmp_path, "sgd")[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    key = process_key(SEED, "sgd/minibatches")
    for step in range(8):
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        np.testing.assert_allclose(positions[step], w, rtol=0, atol=1e-12, err_msg=f"step {step}")
        inputs, targets = along(batch, axes, minibatch(key, step, "with_replacement", N_SEQ, batch_size))
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        assert abs(loss.item() - ds.batch_loss.sel(process="sgd").values[step]) < 1e-12
        loss.backward()
        optimizer.step()
    assert np.linalg.norm(positions[-1] - positions[0]) > 1e-3  # it moved


def backward_grads(model: torch.nn.Module, loss_fn, inputs, targets) -> np.ndarray:
    """The gradient ``loss.backward()`` accumulates on a fresh copy of the model (flat, in its order)."""
    model = copy.deepcopy(model)
    loss_fn(model(inputs), targets).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("layout", ["last", "per_step"])
def test_per_example_gradients_along_axis_1_equal_single_example_backward(layout, recurrent):
    """Per-example gradients of the sequence-first LSTM (all examples; a subset with repeats) equal
    loss.backward() on x[:, i:i+1] (the example axis kept, size 1) one example at a time; the minibatch
    gradient equals backward on x[:, rows]; negative axes name the same axes. The non-recurrent model is
    mapped by torch.func.vmap over axis 1 (the LSTM in float64 is not batched by vmap: the bridge loops)."""
    model, loss_fn, batch, axes = sequence_task(layout, recurrent)
    torch_objective = TorchObjective(model, loss_fn, batch, axes)
    with jax.enable_x64(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objective, w0 = to_jax(torch_objective)
        w = jnp.asarray(w0)
        loop = np.stack([backward_grads(model, loss_fn, *along(batch, axes, torch.tensor([i]))) for i in range(N_SEQ)])
        np.testing.assert_allclose(objective.per_example_grads(w), loop, rtol=0, atol=1e-12 * np.abs(loop).max())
        rows = [5, 0, 5, 11]
        subset = objective.per_example_grads(w, jnp.asarray(rows))
        np.testing.assert_allclose(subset, loop[rows], rtol=0, atol=1e-12 * np.abs(loop).max())
        minibatch_grad = backward_grads(model, loss_fn, *along(batch, axes, torch.tensor(rows)))
        np.testing.assert_allclose(objective.batch_grad(w, jnp.asarray(rows)), minibatch_grad, rtol=0, atol=1e-14)
        assert float(objective.value(w)) == loss_fn(model(batch[0]), batch[1]).item()  # the stored batch
    assert recurrent or torch_objective.vmap_error is None
    said = [str(w.message) for w in caught if "torch.func.vmap cannot batch" in str(w.message)]
    assert len(said) == (1 if recurrent else 0), said  # two per-example calls, one warning
    if recurrent:
        first = torch_objective.vmap_error.splitlines()[0]
        assert said[0].startswith(f"torch.func.vmap cannot batch SequenceModel ({first});")
        assert "per-example gradients in a Python loop" in said[0] and "float32" in said[0]
    negative = (-2, -1)  # x (T, N, 2): axis 1; y (N,) or (T, N): its last
    assert TorchObjective(model, loss_fn, batch, negative).axes == TorchObjective(model, loss_fn, batch, axes).axes


def test_the_loop_over_lanes_equals_vmap():
    """The bridge's fallback for models torch.func.vmap cannot batch (a loop over the lanes) gives the
    per-example gradients and Hessian-vector products vmap gives on an MLP it can batch."""
    model, batch = mlp(), data()
    with jax.enable_x64(True):
        mapped, loop = TorchObjective(model, F.mse_loss, batch), TorchObjective(model, F.mse_loss, batch)
        loop.vmap_error = "forced"
        (a, w0), (b, _) = to_jax(mapped), to_jax(loop)
        w, vectors = jnp.asarray(w0), jax.random.normal(jax.random.PRNGKey(0), (3, w0.size), jnp.float64)
        np.testing.assert_allclose(a.per_example_grads(w), b.per_example_grads(w), rtol=0, atol=1e-15)
        hvps = [jax.vmap(lambda v, o=o: jax.jvp(jax.grad(o.value), (w,), (v,))[1])(vectors) for o in (a, b)]
        np.testing.assert_allclose(*hvps, rtol=0, atol=1e-14)
        assert mapped.vmap_error is None


class Branching(torch.nn.Module):
    """A linear map whose sign depends on the example's own output: data-dependent control flow, which
    torch.func.vmap cannot batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.linear = torch.nn.Linear(2, 3).double()

    def forward(self, x):
        y = self.linear(x)
        return y if y.sum() > 0 else -y


def test_the_loop_fallback_warns_once_naming_the_model_the_lanes_and_the_remedy():
    """A model vmap cannot batch over examples (an `if` on the example's output): one UserWarning per
    objective for two calls that loop, naming the model's class, what is looped (per-example gradients),
    vmap's first line and torch.where; the looped gradients equal torch's, one example at a time. An MLP
    vmap batches says nothing."""
    model, batch = Branching(), data()
    loop = np.stack([torch_grads(model, batch[0][i : i + 1], batch[1][i : i + 1]) for i in range(N)])
    assert len({np.sign(model.linear(batch[0][i]).sum().item()) for i in range(N)}) == 2  # both branches taken
    with jax.enable_x64(True):
        torch_objective = TorchObjective(model, F.mse_loss, batch)
        objective, w0 = to_jax(torch_objective)
        with pytest.warns(UserWarning, match="torch.func.vmap cannot batch") as caught:
            for rows in (None, jnp.arange(0, N, 2)):
                expected = loop if rows is None else loop[::2]
                np.testing.assert_allclose(objective.per_example_grads(jnp.asarray(w0), rows), expected, atol=1e-14)
        said = [str(w.message) for w in caught if "vmap" in str(w.message)]
        assert len(said) == 1, said
        first = torch_objective.vmap_error.splitlines()[0]
        assert f"cannot batch Branching ({first}); eosflow evaluates the per-example gradients in a Python" in said[0]
        assert "data-dependent control flow" in first and "torch.where" in said[0]
        plain = TorchObjective(mlp(), F.mse_loss, batch)
        objective, w0 = to_jax(plain)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            objective.per_example_grads(jnp.asarray(w0))
        assert plain.vmap_error is None


def test_example_axis_0_is_the_default_for_a_batch_first_lstm(tmp_path):
    """For a batch_first=True LSTM, example_axis=0 is an identity: SGD with the noise trace (per-example
    gradients) records the same numbers, bitwise, as the default."""
    torch.manual_seed(4)
    model = SequenceModel(per_step=True, batch_first=True).double()
    rng = np.random.default_rng(5)
    batch = (torch.tensor(rng.normal(size=(N_SEQ, T, 2))), torch.tensor(rng.normal(size=(N_SEQ, T))))
    settings = dict(lr=0.5, steps=4, seed=SEED, processes=["sgd"], spectrum={"every": 0}) | {
        "options": {"sgd": {"batch_size": 4, "noise_every": 2}},
        "record": {"params_every": 1},
    }
    runs = []
    for name, axis in (("default", None), ("axis0", 0)):
        problem = eosflow.torch.problem(model, F.mse_loss, batch, example_axis=axis)
        runs.append((eosflow.simulate(problem, out=tmp_path / name, **settings), load_params(tmp_path / name, "sgd")))
    (default, (_, p_default)), (axis0, (_, p_axis0)) = runs
    for field in ("loss", "batch_loss", "grad_norm", "noise_trace"):
        np.testing.assert_array_equal(default[field].values, axis0[field].values, err_msg=field)
    assert np.isfinite(default.noise_trace.sel(process="sgd").values[::2]).all()
    np.testing.assert_array_equal(p_default, p_axis0)


def test_example_axis_errors_name_the_tensor_and_sizes():
    """Disagreeing sizes along the named axes, an axis out of range, a non-int axis and an axes pytree
    that does not match the batch are ValueErrors naming the tensor (by position), the sizes or the axis;
    an explicit axis whose sizes disagree is an error, not the default's silent "no examples"."""
    model, loss_fn, (x, y), _ = sequence_task("last")
    cases = [
        ((x, y[:-1]), (1, 0), r"batch\[0\] \(inputs\) has 12 along axis 1, batch\[1\] \(targets\) has 11 along axis 0"),
        ((x, y), 0, r"batch\[0\] \(inputs\) has 4 along axis 0, batch\[1\] \(targets\) has 12 along axis 0"),
        ((x, y), (3, 0), r"example_axis 3 is out of range for batch\[0\] \(inputs\) of shape \(4, 12, 2\) \(3 dims\)"),
        ((x, y), (1, -2), r"example_axis -2 is out of range for batch\[1\] \(targets\) of shape \(12,\)"),
        ((x, y), (1.0, 0), r"example_axis for batch\[0\] \(inputs\) must be an int, got 1.0"),
        ((x, y), (1, 0, 0), r"example_axis \(1, 0, 0\) does not match the structure of the batch"),
        ((x, y), [1, 0], r"does not match the structure of the batch \(shapes \(\(4, 12, 2\), \(12,\)\)\)"),
    ]
    for batch, axes, message in cases:
        with pytest.raises(ValueError, match=message):
            eosflow.torch.problem(model, loss_fn, batch, example_axis=axes)
