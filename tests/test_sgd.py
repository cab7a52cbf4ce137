"""SGD: the PyTorch heavy-ball recursion, minibatch noise, and its exact stationary statistics.

Oracles: the GD process, a plain numpy transcription of torch.optim.SGD's update, per-example
gradients of linear regression in closed form (x_i (x_i^T w - y_i)), the AR(2) closed forms of
eosflow.theory checked against simulation with batch-means standard errors, and an ensemble of
independent SGD chains for the transient moments.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.config import SpecError
from eosflow.experiment import prepare, run
from eosflow.optim.sgd import (
    gradient_noise_top,
    gradient_noise_trace,
    minibatch_noise_scale,
    sample_batch,
    step_noise,
)
from eosflow.theory import linear_regression as theory


def regression_table(**sgd):
    return {
        "steps": 10,
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["sgd", "gd"],
        "problem": {"name": "linear_regression", "dim": 6, "n_train": 40, "noise": 0.5},
        "spectrum": {"every": 0},
        "sgd": sgd,
    }


def closed_form_per_example_grads(problem, w):
    x, y = map(np.asarray, problem.objective.data)
    return x * (x @ np.asarray(w) - y)[:, None]


def batch_means_error(samples: np.ndarray, blocks: int = 25) -> float:
    """Standard error of the mean of an autocorrelated series, by the means of contiguous blocks."""
    means = samples[: len(samples) // blocks * blocks].reshape(blocks, -1).mean(axis=1)
    return float(means.std(ddof=1) / np.sqrt(blocks))


def test_full_batch_sgd_without_momentum_is_gd():
    spec, problem, _, processes = prepare(regression_table(batch_size=40, sampling="without_replacement"))
    rows = {name: p.advance(p.init(problem.w0), 50)[1] for name, p in processes.items()}
    np.testing.assert_allclose(rows["sgd"]["position"], rows["gd"]["position"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rows["sgd"]["loss"], rows["gd"]["loss"], rtol=1e-12)


def test_heavy_ball_follows_the_pytorch_recursion():
    """buf <- beta buf + (g_B + lam w); w <- w - lr buf (torch.optim.SGD, dampening 0, no Nesterov)."""
    options = dict(batch_size=5, momentum=0.8, weight_decay=0.03, sampling="shuffle")
    spec, problem, _, processes = prepare(regression_table(**options))
    sgd = processes["sgd"]
    _, rows = sgd.advance(sgd.init(problem.w0), 30)
    x, y = map(np.asarray, problem.objective.data)
    w, buf = np.asarray(problem.w0, float), np.zeros(6)
    for k in range(30):
        np.testing.assert_allclose(rows["position"][k], w, atol=1e-12)
        np.testing.assert_allclose(rows["loss"][k], 0.5 * np.mean((x @ w - y) ** 2), rtol=1e-12)
        idx = np.asarray(sample_batch(sgd.sample_key, jnp.asarray(k), 40, 5, "shuffle"))
        grad = x[idx].T @ (x[idx] @ w - y[idx]) / 5 + 0.03 * w
        buf = 0.8 * buf + grad
        np.testing.assert_allclose(rows["step_norm_sq"][k], np.sum((0.05 * buf) ** 2), rtol=1e-10)
        w = w - 0.05 * buf


def test_shuffled_epochs_visit_every_example_once():
    key = jax.random.PRNGKey(3)
    batches = np.stack([np.asarray(sample_batch(key, jnp.asarray(k), 40, 8, "shuffle")) for k in range(10)])
    for epoch in (batches[:5], batches[5:]):
        np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(40))
    assert not np.array_equal(batches[:5], batches[5:])


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement"])
def test_minibatch_gradient_covariance(sampling):
    """Cov(g_B - g) over many steps = Sigma_g / S (x (N - S)/(N - 1) for distinct examples)."""
    spec, problem, _, processes = prepare(regression_table(batch_size=10, sampling=sampling))
    sgd, w = processes["sgd"], problem.w0
    draws = 20000
    grads = eqx.filter_jit(jax.vmap(lambda s: sgd.minibatch_gradient(w, s)[1]))(jnp.arange(draws))
    empirical = np.cov(np.asarray(grads).T, bias=True)
    per_example = closed_form_per_example_grads(problem, w)
    sigma_g = np.cov(per_example.T, bias=True)
    expected = minibatch_noise_scale(40, 10, sampling) * sigma_g
    # the trace estimate's relative standard error is about sqrt(2 / draws) ~ 1%
    assert np.trace(empirical) == pytest.approx(np.trace(expected), rel=0.05)
    assert np.linalg.norm(empirical - expected) < 0.08 * np.linalg.norm(expected)
    np.testing.assert_allclose(
        np.asarray(grads).mean(axis=0), per_example.mean(axis=0), atol=4 * np.sqrt(np.trace(expected) / draws)
    )


@pytest.mark.parametrize("n_train", [40, 3])  # n > d and n < d take different eigen-routes
def test_noise_trace_and_top_directions(n_train):
    table = regression_table(batch_size=2)
    table["problem"]["n_train"] = n_train
    _, problem, _, _ = prepare(table)
    w = problem.w0
    sigma_g = np.cov(closed_form_per_example_grads(problem, w).T, bias=True)
    values, vectors = np.linalg.eigh(sigma_g)
    trace = eqx.filter_jit(gradient_noise_trace)(problem.objective, w)
    assert float(trace) == pytest.approx(np.trace(sigma_g), rel=1e-10)
    top_values, top_vectors = eqx.filter_jit(gradient_noise_top)(problem.objective, w, k=2)
    np.testing.assert_allclose(top_values, values[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(top_vectors) * vectors[:, ::-1][:, :2], axis=0)), 1, atol=1e-8)
    options = dataclasses.replace(eosflow.optim.sgd.SGDOptions(), batch_size=4, gradient_noise=0.3)
    trace, projected = eqx.filter_jit(step_noise)(problem.objective, w, options, jnp.asarray(vectors))
    scale = minibatch_noise_scale(n_train, 4, "with_replacement")
    assert float(trace) == pytest.approx(scale * np.trace(sigma_g) + 6 * 0.09 / 4, rel=1e-10)
    np.testing.assert_allclose(projected, np.diag(scale * values + 0.09 / 4), atol=1e-12)


LR, MOMENTUM = 0.1, 0.9
LR_CURVATURES = (0.25, 0.75, 1.5)  # lr * h, up to the acceptance's 1.5 (stable below 2 (1 + beta) = 3.8)
COPIES = 16  # independent coordinates per curvature


def run_noisy_quadratic(process: str, steps: int, **options):
    """Stationary positions of ``process`` on L = 1/2 sum h_i w_i^2 with gradient noise N(0, I)."""
    eigenvalues = list(np.repeat(np.array(LR_CURVATURES) / LR, COPIES))
    table = {
        "lr": LR,
        "dtype": "float64",
        "processes": [process],
        "spectrum": {"every": 0},
        "problem": {"name": "quadratic", "eigenvalues": eigenvalues, "rotate": False, "init_scale": 0.01},
        process: {"momentum": MOMENTUM, "gradient_noise": 1.0, "batch_size": 1, **options},
    }
    _, problem, _, processes = prepare(table)
    p = processes[process]
    state, _ = p.advance(p.init(problem.w0), 300)
    _, rows = p.advance(state, steps)
    return rows


def grouped(samples: np.ndarray) -> np.ndarray:
    """(steps, d) -> (steps, groups): the mean over the COPIES coordinates of each curvature."""
    return samples.reshape(len(samples), len(LR_CURVATURES), COPIES).mean(axis=2)


def test_exact_discrete_stationary_variances_and_the_continuous_deficit():
    """Quadratic + Gaussian noise, beta = 0.9: Var(theta), Var(step) = the AR(2) closed forms."""
    rows = run_noisy_quadratic("sgd", 20000)
    theta = np.asarray(rows["position"])
    h = np.array(LR_CURVATURES) / LR
    discrete = theory.mode_variances(h, 1.0, LR, MOMENTUM, "discrete")
    continuous = theory.mode_variances(h, 1.0, LR, MOMENTUM, "continuous")
    for name, samples, predicted in (
        ("theta", theta[:-1] ** 2, discrete.theta),
        ("step", np.diff(theta, axis=0) ** 2, discrete.step),
    ):
        per_group = grouped(samples)
        measured = per_group.mean(axis=0)
        errors = np.array([batch_means_error(per_group[:, g]) for g in range(len(h))])
        assert np.all(np.abs(measured - predicted) < 4 * errors), (name, measured, predicted, errors)
        assert np.all(np.abs(measured / predicted - 1) < 0.06), (name, measured / predicted)
    # the continuous model misses exactly the factor 1 / (1 - lr h / (2 (1 + beta)))
    measured = grouped(theta**2).mean(axis=0)
    factor = theory.continuous_correction(h, LR, MOMENTUM)
    assert factor[-1] == pytest.approx(1.652, abs=1e-3)
    np.testing.assert_allclose(measured / continuous.theta, factor, rtol=0.06)
    assert measured[-1] / continuous.theta[-1] > 1.5  # a 40% underestimate at lr h = 1.5
    # the recorded local displacement is the step, and its mean the sum of the step variances
    step_sq = np.asarray(rows["step_norm_sq"])
    assert step_sq.mean() == pytest.approx(COPIES * discrete.step.sum(), rel=0.05)


def test_minibatch_linear_regression_predictions_from_stationary_residuals():
    """Per-mode Var(theta) and the step are predicted within 15% with sigma^2 from the residuals.

    The label noise (sigma^2 = 1) underestimates them: the noise grows away from the optimum.
    """
    lr, beta, batch = 0.1, 0.9, 16
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": ["sgd"],
        "spectrum": {"every": 0},
        "problem": {"name": "linear_regression", "dim": 32, "n_train": 2048, "noise": 1.0, "decay": 0.5},
        "sgd": {"batch_size": batch, "momentum": beta, "loss_every": 20},
    }
    _, problem, _, processes = prepare(table)
    sgd = processes["sgd"]
    state, _ = sgd.advance(sgd.init(problem.w0), 1000)
    _, rows = sgd.advance(state, 40000)
    model = theory.regression_model(*problem.objective.data)
    values, vectors = np.linalg.eigh(model.hessian)
    modes = (np.asarray(rows["position"]) - model.minimizer) @ vectors
    sigma2 = theory.residual_noise(rows["loss"])
    predicted = theory.mode_variances(values, sigma2 * values / batch, lr, beta)
    ratio = modes.var(axis=0) / predicted.theta
    assert np.max(np.abs(ratio - 1)) < 0.15, ratio
    assert np.mean(rows["step_norm_sq"]) / predicted.step.sum() == pytest.approx(1, abs=0.15)
    label = theory.mode_variances(values, 1.0 * values / batch, lr, beta)
    assert modes.var(axis=0).sum() / label.theta.sum() > 1.25


def ensemble_positions(process, key_field: str, w0, steps: np.ndarray, chains: int, seed: int) -> np.ndarray:
    """Positions (chains x len(steps) x d) of independent copies of ``process`` that differ only
    in the random stream ``key_field``, all started from ``w0``."""

    def chain(key):
        p = eqx.tree_at(lambda q: getattr(q, key_field), process, key)
        _, rows = jax.lax.scan(lambda s, _: p.step(s), p.init(w0), None, length=int(steps.max()) + 1)
        return rows["position"][steps]

    keys = jax.random.split(jax.random.PRNGKey(seed), chains)
    return np.asarray(eqx.filter_jit(jax.vmap(chain))(keys))


def assert_moments_match(positions: np.ndarray, moments, d: int) -> None:
    """Ensemble mean within 4 standard errors, covariance within 10% of the largest variance."""
    for i in range(positions.shape[1]):
        cov = moments.covariance[i, :d, :d]
        se = np.sqrt(np.diag(cov) / len(positions))
        assert np.all(np.abs(positions[:, i].mean(axis=0) - moments.mean[i, :d]) < 4 * se + 1e-3)
        np.testing.assert_allclose(np.cov(positions[:, i].T), cov, atol=0.1 * np.max(np.diag(cov)))


def test_exact_moments_from_initialization():
    """Mean and covariance of theta after k steps: the recursion's closed form vs 4000 chains."""
    lr, beta = 0.2, 0.7
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": ["sgd"],
        "spectrum": {"every": 0},
        "problem": {"name": "quadratic", "eigenvalues": [4.0, 1.0], "rotate": True, "init_scale": 2.0},
        "sgd": {"momentum": beta, "gradient_noise": 0.5, "batch_size": 1},
    }
    _, problem, _, processes = prepare(table)
    steps = np.array([3, 10, 40])
    positions = ensemble_positions(processes["sgd"], "sample_key", problem.w0, steps, 4000, seed=0)
    hessian = np.asarray(jax.jit(jax.hessian(problem.objective.value))(problem.w0))
    transition, noise = theory.discrete_system(hessian, 0.25 * np.eye(2), lr, beta)
    start = np.concatenate([np.asarray(problem.w0), np.zeros(2)])
    assert_moments_match(positions, theory.discrete_moments(transition, noise, start, np.zeros((4, 4)), steps), 2)


def test_resume_draws_the_same_batches(tmp_path):
    table = regression_table(batch_size=6, momentum=0.9, sampling="shuffle")
    table.update(steps=300, processes=["sgd"], record={"chunk": 100, "params_every": 1})
    run(table, tmp_path / "whole")
    run(table, tmp_path / "parts", stop_after=200)
    run(table, tmp_path / "parts", resume=True)
    whole, parts = (eosflow.load_params(tmp_path / name, "sgd")[1] for name in ("whole", "parts"))
    np.testing.assert_array_equal(whole, parts)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "sgd.batch_size"),
        ("batch_size", 41, "sgd.batch_size"),
        ("momentum", 1.0, "sgd.momentum"),
        ("sampling", "epochs", "sgd.sampling"),
        ("loss_every", 0, "sgd.loss_every"),
        ("noise_examples", 41, r"`sgd.noise_examples` = 41 exceeds the problem's 40"),  # (clipped to 40 before)
        ("noise_examples", 1, r"`sgd.noise_examples` = 1 estimates the gradient covariance from one example"),
    ],
)
def test_bad_options_name_the_field(field, value, message):
    with pytest.raises(SpecError, match=message):
        prepare(regression_table(**{field: value}))


def test_sgd_without_data_or_noise_says_it_is_gd():
    """A loss of w alone has no minibatches: with gradient_noise = 0 sgd is full-batch GD, which a
    SpecWarning says (and not with noise, nor on a problem with data)."""
    import warnings

    from eosflow.config import SpecWarning
    from eosflow.experiment import prepare

    toy = {"steps": 2, "lr": 0.1, "dtype": "float64", "processes": ["sgd"], "problem": {"name": "quartic"}}
    with pytest.warns(SpecWarning, match="full-batch GD"):
        prepare(toy)
    with pytest.warns(SpecWarning, match="noise_every` .* a problem without data has none: noise_trace reads NaN"):
        prepare({**toy, "sgd": {"gradient_noise": 0.1, "noise_every": 2}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        prepare({**toy, "sgd": {"gradient_noise": 0.1, "batch_size": 1}})
        prepare({**toy, "problem": {"name": "mlp", "width": 4, "n_train": 40, "n_test": 0}})


def counted_examples(processes, steps, options):
    """Examples the model's forward pass saw in ``steps`` steps (a host callback in the model, per example)."""
    seen = []

    def apply(params, x):
        jax.debug.callback(lambda v: seen.append(np.size(v)), x[..., 0])
        return jnp.tanh(x @ params["a"]) @ params["b"]

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 2))
    params = {"a": 0.3 * rng.standard_normal((4, 5)), "b": 0.3 * rng.standard_normal((5, 2))}
    problem = eosflow.Problem.from_model(apply, params, x, y, loss="mse")
    seen.clear()
    ds = eosflow.simulate(
        problem, lr=0.05, steps=steps, processes=processes, spectrum={"every": 0}, dtype="float64", options=options
    )
    return sum(seen), ds["grads"].sel(process=processes[0]).values


@pytest.mark.parametrize(
    "process, options",
    [
        ("sgd", {"sgd": {"batch_size": 6}}),
        ("sgd", {"sgd": {"batch_size": 30, "momentum": 0.5}}),
        ("sgd", {"sgd": {"batch_size": 1, "sampling": "with_replacement"}}),
        ("langevin", {"sgd": {"batch_size": 6}}),
        ("langevin", {"langevin": {"batch_size": 5, "substeps": 3, "noise_examples": 10}}),
        ("langevin", {"langevin": {"batch_size": 8, "substeps": 2, "integrator": "euler_maruyama"}}),
    ],
)
def test_the_recorded_gradient_cost_is_the_examples_differentiated(process, options):
    """``grads`` per step (in full-batch gradients) against the examples the model's forward pass saw, counted
    in the model: the difference of two run lengths leaves one step's evaluations (N = 30)."""
    options = {key: {**table, "loss_every": 1000} if key == "sgd" else table for key, table in options.items()}
    short, _ = counted_examples([process], 4, options)
    long, grads = counted_examples([process], 9, options)
    per_step = (long - short) / 5 / 30
    assert per_step > 0
    np.testing.assert_allclose(grads, per_step, rtol=1e-12)
