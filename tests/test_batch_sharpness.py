"""Batch sharpness: the curvature of a minibatch's own loss along the step taken on it.

Oracles: linear regression in closed form (H_B = X_B^T X_B / S, g_B = X_B^T r_B / S) with a numpy transcription
of SGD's recursion; the exact identity of a quadratic, L_B(w - lr b) - L_B(w) = -lr descent + lr^2/2 curvature;
every batch of a small problem enumerated in numpy (the expectation over batches); central differences of the
batch gradient on an MLP."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.experiment import prepare
from eosflow.optim.sgd import sample_batch
from eosflow.precision import precision


def regression_table(**sgd):
    return {
        "steps": 25,
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["sgd"],
        "problem": {"name": "linear_regression", "dim": 6, "n_train": 40, "noise": 0.5},
        "spectrum": {"every": 0},
        "sgd": sgd,
    }


@pytest.mark.parametrize(
    "options",
    [
        dict(batch_size=5, sampling="with_replacement"),
        dict(batch_size=8, momentum=0.9, sampling="shuffle"),
        dict(batch_size=3, momentum=0.5, weight_decay=0.03, sampling="without_replacement"),
        dict(batch_size=40, weight_decay=0.01, sampling="without_replacement", batch_sharpness_every=3),
    ],
)
def test_sgds_batch_quotient_is_its_batchs_second_order_loss_change(options):
    """Every recorded step: batch_curvature = b^T (X_B^T X_B / S + lam I) b and batch_descent = (g_B + lam w)^T b
    in closed form along numpy's own buffer b, to 1e-10, and on this quadratic the batch's regularized loss
    change under the step is exactly -lr descent + lr^2/2 curvature; steps off the `every` grid are NaN."""
    every = options.pop("batch_sharpness_every", 1)
    lam, beta, size = options.get("weight_decay", 0.0), options.get("momentum", 0.0), options["batch_size"]
    spec, problem, _, processes = prepare(regression_table(**options, batch_sharpness_every=every))
    sgd = processes["sgd"]
    _, rows = sgd.advance(sgd.init(problem.w0), 25)
    x, y = map(np.asarray, problem.objective.data)
    w, buffer = np.asarray(problem.w0, float), np.zeros(x.shape[1])
    for k in range(25):
        idx = np.asarray(sample_batch(sgd.sample_key, jnp.asarray(k), 40, size, options["sampling"]))
        xb, yb = x[idx], y[idx]
        gradient = xb.T @ (xb @ w - yb) / size
        buffer = beta * buffer + gradient + lam * w
        curvature, descent = rows["batch_curvature"][k], rows["batch_descent"][k]
        if k % every:
            assert np.isnan(curvature) and np.isnan(descent)
        else:
            hessian = xb.T @ xb / size + lam * np.eye(x.shape[1])
            np.testing.assert_allclose(curvature, buffer @ hessian @ buffer, rtol=1e-10)
            np.testing.assert_allclose(descent, (gradient + lam * w) @ buffer, rtol=1e-10)

            def batch_loss(v, xb=xb, yb=yb):
                return 0.5 * np.mean((xb @ v - yb) ** 2) + 0.5 * lam * v @ v

            change = batch_loss(w - 0.05 * buffer) - batch_loss(w)
            np.testing.assert_allclose(change, -0.05 * descent + 0.05**2 / 2 * curvature, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(rows["position"][k], w, atol=1e-12)
        w = w - 0.05 * buffer


def test_batch_sharpness_over_every_batch_is_the_enumerated_expectation():
    """eosflow.batch_sharpness over all C(9, 3) batches of a random MLP (pytree parameters, float64) equals
    E_B[g_B^T H_B g_B / |g_B|^2] with each batch's Hessian formed densely; each quotient is a Rayleigh
    quotient of its batch Hessian, so it lies within that Hessian's spectrum."""
    rng = np.random.default_rng(0)
    with precision("float64"):
        x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 2))
        params = {"a": jnp.asarray(rng.normal(size=(3, 5))), "b": jnp.asarray(rng.normal(size=(5, 2)) / 2)}

        def loss(p, batch):
            xb, yb = batch
            return 0.5 * jnp.mean(jnp.sum((jnp.tanh(xb @ p["a"]) @ p["b"] - yb) ** 2, axis=-1))

        subsets = np.asarray(list(itertools.combinations(range(9), 3)))
        batches = (jnp.asarray(x[subsets]), jnp.asarray(y[subsets]))
        value, quotients = eosflow.batch_sharpness.batch_sharpness(loss, params, batches)

        from jax.flatten_util import ravel_pytree

        flat, unflatten = ravel_pytree(params)

        def on_flat(w, b):
            return loss(unflatten(w), b)

        grad, hessian = jax.jit(jax.grad(on_flat)), jax.jit(jax.hessian(on_flat))  # one program each, not op by op
        numerators, denominators = [], []
        for subset in subsets:
            batch = (jnp.asarray(x[subset]), jnp.asarray(y[subset]))
            g = np.asarray(grad(flat, batch))
            h = np.asarray(hessian(flat, batch))
            numerators.append(g @ h @ g)
            denominators.append(g @ g)
            spectrum = np.linalg.eigvalsh(h)
            quotient = numerators[-1] / denominators[-1]
            assert spectrum[0] - 1e-12 <= quotient <= spectrum[-1] + 1e-12
        np.testing.assert_allclose(quotients.curvature, numerators, rtol=1e-10)
        np.testing.assert_allclose(quotients.descent, denominators, rtol=1e-12)
        np.testing.assert_allclose(value, np.mean(np.divide(numerators, denominators)), rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_sgds_batch_quotient_on_an_mlp_matches_central_differences(seed):
    """On the digits MLP (float64, random batch size and momentum): at recorded steps H_B b from the record
    equals the central difference of the batch gradient along b, (g_B(w + h b) - g_B(w - h b)) / 2h,
    projected on b, to 1e-6 relative."""
    rng = np.random.default_rng(seed)
    size, beta = int(rng.integers(4, 20)), float(rng.choice([0.0, 0.9]))
    table = {
        "steps": 12,
        "lr": 0.2,
        "dtype": "float64",
        "seed": seed,
        "processes": ["sgd"],
        "problem": {"name": "mlp", "dataset": "digits", "n_train": 100, "n_test": 0, "width": 8, "depth": 1},
        "spectrum": {"every": 0},
        "sgd": {"batch_size": size, "momentum": beta, "batch_sharpness_every": 4, "sampling": "without_replacement"},
    }
    _, problem, _, processes = prepare(table)
    sgd = processes["sgd"]
    with precision("float64"):
        _, rows = sgd.advance(sgd.init(problem.w0), 12)
        buffer = np.zeros(np.asarray(problem.w0).size)
        for k in range(12):
            w = jnp.asarray(rows["position"][k])
            gradient = np.asarray(sgd.minibatch_gradient(w, jnp.asarray(k))[1])
            buffer = beta * buffer + gradient
            if k % 4:
                continue
            h = 1e-5 / np.linalg.norm(buffer)
            plus = np.asarray(sgd.minibatch_gradient(w + h * buffer, jnp.asarray(k))[1])
            minus = np.asarray(sgd.minibatch_gradient(w - h * buffer, jnp.asarray(k))[1])
            np.testing.assert_allclose(rows["batch_curvature"][k], buffer @ (plus - minus) / (2 * h), rtol=1e-6)
            np.testing.assert_allclose(rows["batch_descent"][k], gradient @ buffer, rtol=1e-12)


def test_the_report_shows_batch_sharpness_in_windows(tmp_path):
    """A run with `batch_sharpness_every` gets a "Batch sharpness" part in its SGD section and figure: the first
    and last windows' lr/2 mean(curvature/descent) recomputed from the stored rows by hand (20 equal windows
    of the steps, unmeasured steps skipped); a run without it gets none."""
    from eosflow.experiment import run
    from eosflow.report import make_report

    table = {
        **regression_table(batch_size=4, batch_sharpness_every=3),
        "steps": 200,
        "lr": 0.3,
        "spectrum": {"every": 10, "k_max": 1},
    }
    run(table, tmp_path / "with")
    text = make_report(tmp_path / "with").read_text()
    assert (tmp_path / "with" / "report" / "sgd_batch_sharpness.png").exists()
    line = next(row for row in text.split("### Batch sharpness")[1].splitlines() if "first window" in row)
    first = float(line.split("in the first window")[0].split()[-1])
    last = float(line.split("in the last")[0].split(", ")[-1].split()[0])
    ds = eosflow.load(tmp_path / "with").sel(process="sgd")
    curvature, descent = ds.batch_curvature.values, ds.batch_descent.values
    assert np.isfinite(curvature[::3]).all() and np.isnan(curvature[1::3]).all()
    windows = [np.arange(200)[a:b] for a, b in zip(range(0, 200, 10), range(10, 210, 10))]
    by_hand = [0.15 * np.nanmean(curvature[w] / descent[w]) for w in windows]
    assert first == pytest.approx(by_hand[0], abs=6e-4) and last == pytest.approx(by_hand[-1], abs=6e-4)

    run({**table, "sgd": {"batch_size": 4}}, tmp_path / "without")
    assert "### Batch sharpness" not in make_report(tmp_path / "without").read_text()


def test_a_torch_models_batch_sharpness_is_the_dense_expectation():
    """eosflow.torch.batch_sharpness over four batches of a float64 torch MLP equals the mean of g^T H g / |g|^2 with
    each batch's gradient and Hessian from torch.autograd.functional on the flat parameters, and leaves the
    model's parameters and gradients as they were."""
    torch = pytest.importorskip("torch")
    import eosflow.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    batches = [
        (torch.randn(size, 3, dtype=torch.float64), torch.randn(size, 2, dtype=torch.float64)) for size in (4, 4, 7, 2)
    ]
    before = [p.detach().clone() for p in model.parameters()]
    value, quotients = eosflow.torch.batch_sharpness(model, torch.nn.functional.mse_loss, batches)

    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w, x, y):
        pieces = torch.split(w, [int(np.prod(s)) for s in shapes])
        (w1, b1, w2, b2) = (piece.reshape(s) for piece, s in zip(pieces, shapes))
        return torch.nn.functional.mse_loss(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)

    numerators, denominators = [], []
    for x, y in batches:
        g = torch.autograd.functional.jacobian(lambda w, x=x, y=y: loss(w, x, y), flat).numpy()
        h = torch.autograd.functional.hessian(lambda w, x=x, y=y: loss(w, x, y), flat).numpy()
        numerators.append(g @ h @ g)
        denominators.append(g @ g)
    np.testing.assert_allclose(quotients.curvature, numerators, rtol=1e-10)
    np.testing.assert_allclose(quotients.descent, denominators, rtol=1e-12)
    assert value == pytest.approx(np.mean(np.divide(numerators, denominators)), rel=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("case", ["tanh-mse", "relu-l1", "linear-l1"])
def test_torch_gradient_and_its_hvp_from_one_pass(case):
    """TorchObjective.grad_and_hvp_along_grad (one gradient pass, its vjp along g) equals g and H g from
    torch.autograd.functional's dense Hessian of the flat parameters, H = 0 included (a linear model under the
    L1 loss, whose gradient does not depend on w)."""
    torch = pytest.importorskip("torch")
    from eosflow.torch.objective import TorchObjective

    torch.manual_seed(len(case))
    layers = {
        "tanh-mse": [torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)],
        "relu-l1": [torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)],
        "linear-l1": [torch.nn.Linear(3, 2)],
    }[case]
    model = torch.nn.Sequential(*layers).double()
    loss_fn = torch.nn.functional.mse_loss if case.endswith("mse") else torch.nn.functional.l1_loss
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    objective = TorchObjective(model, loss_fn, batch)
    w = objective.flat_parameters()
    gradient, image = objective.grad_and_hvp_along_grad(w, batch)

    def loss(flat):
        return loss_fn(torch.func.functional_call(model, objective.unflatten(flat), (batch[0],)), batch[1])

    g = torch.autograd.functional.jacobian(loss, w).numpy()
    h = torch.autograd.functional.hessian(loss, w).numpy()
    np.testing.assert_allclose(gradient.numpy(), g, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(image.numpy(), h @ g, rtol=1e-10, atol=1e-14)
    assert (np.abs(h @ g).max() == 0) == (case == "linear-l1")


def test_batches_as_a_list_or_stacked():
    """A list of batches (as torch users pass them) equals the same batches stacked, to 1e-12; a list of batches
    of different sizes is taken one by one (each batch's curvature against its dense Hessian); leaves without a
    common leading axis are refused, naming the sizes."""
    rng = np.random.default_rng(2)
    with precision("float64"):
        params = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(4,)))}

        def loss(p, batch):
            x, y = batch
            return 0.5 * jnp.mean((jnp.tanh(x @ p["a"]) @ p["b"] - y) ** 2)

        listed = [(jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6,)))) for _ in range(4)]
        stacked = (jnp.stack([b[0] for b in listed]), jnp.stack([b[1] for b in listed]))
        by_list, quotients = eosflow.batch_sharpness.batch_sharpness(loss, params, listed)
        by_stack, _ = eosflow.batch_sharpness.batch_sharpness(loss, params, stacked)
        assert float(by_list) == pytest.approx(float(by_stack), rel=1e-12) and quotients.curvature.shape == (4,)

        from jax.flatten_util import ravel_pytree

        flat, unflatten = ravel_pytree(params)
        uneven = [(jnp.asarray(rng.normal(size=(n, 3))), jnp.asarray(rng.normal(size=(n,)))) for n in (2, 5, 9)]
        value, quotients = eosflow.batch_sharpness.batch_sharpness(loss, params, uneven)

        def on_flat(w, b):
            return loss(unflatten(w), b)

        grad, hessian = jax.jit(jax.grad(on_flat)), jax.jit(jax.hessian(on_flat))  # one program each, not op by op
        ratios = []
        for batch, curvature in zip(uneven, quotients.curvature):
            g = np.asarray(grad(flat, batch))
            h = np.asarray(hessian(flat, batch))
            np.testing.assert_allclose(curvature, g @ h @ g, rtol=1e-10)
            ratios.append(g @ h @ g / (g @ g))
        assert float(value) == pytest.approx(float(np.mean(ratios)), rel=1e-10)
        with pytest.raises(ValueError, match=r"do not share a leading axis \(sizes \['4', '5'\]\)"):
            eosflow.batch_sharpness.batch_sharpness(loss, params, (stacked[0], stacked[1][:, :5].T[:5]))
        with pytest.raises(ValueError, match="stacked batches' leading axis is empty"):  # NaN before
            eosflow.batch_sharpness.batch_sharpness(loss, params, (stacked[0][:0], stacked[1][:0]))


@pytest.mark.parametrize("n_batches, size", [(8, 4), (24, 10)])
def test_the_standard_error_covers_the_spread_of_batch_sharpness_over_draws(n_batches, size):
    """The estimate from n random batches, drawn again 300 times: the spread (std) of the 300 estimates equals
    the mean reported standard error to 15%, and the true value (the mean over every batch of a 2000-batch
    pool the draws come from) lies within 2 standard errors in 85-99% of the draws."""
    rng = np.random.default_rng(n_batches)
    with precision("float64"):
        params = {"a": jnp.asarray(rng.normal(size=(3, 5))), "b": jnp.asarray(rng.normal(size=(5,)))}

        def loss(p, batch):
            x, y = batch
            return 0.5 * jnp.mean((jnp.tanh(x @ p["a"]) @ p["b"] - y) ** 2)

        pool = (jnp.asarray(rng.normal(size=(2000, size, 3))), jnp.asarray(rng.normal(size=(2000, size))))
        _, everything = eosflow.batch_sharpness.batch_sharpness(loss, params, pool)
        q = np.asarray(everything.value)
        truth = q.mean()
        draws = [rng.choice(q.size, n_batches, replace=False) for _ in range(300)]
        estimates = np.array([q[d].mean() for d in draws])
        errors = np.array(
            [
                eosflow.batch_sharpness.BatchQuotient(everything.curvature[d], everything.descent[d]).standard_error()
                for d in draws
            ]
        )
    assert np.std(estimates) == pytest.approx(np.mean(errors), rel=0.15)
    covered = np.mean(np.abs(estimates - truth) <= 2 * errors)
    assert 0.85 <= covered <= 0.99  # 2 standard errors: 95% for a normal mean, ~91% for t with 7 dof
    assert np.isnan(eosflow.batch_sharpness.BatchQuotient(np.ones(1), np.ones(1)).standard_error())
