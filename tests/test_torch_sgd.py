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


def minibatch(key, step: int, sampling: str) -> torch.Tensor:
    """The rows of step ``step``, drawn as a float64 run draws them (x64: randint's integers are 64-bit)."""
    with jax.enable_x64(True):
        return torch.from_numpy(np.array(sample_batch(key, jnp.asarray(step), N, 8, sampling)))


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
