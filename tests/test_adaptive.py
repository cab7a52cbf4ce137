"""Momentum, Nesterov, RMSProp and Adam against optax (or a numpy reference where optax has no
such form) to 1e-12 in float64 over 100 steps; their preconditioned eigenpairs against dense
eigenvalues of P^{-1} H; thresholds on a quadratic."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eosflow.config import SpecError
from eosflow.experiment import prepare
from eosflow.spectrum import dense_hessian

PROBLEM = {"name": "mlp", "dataset": "digits", "n_train": 40, "n_test": 0, "width": 6, "depth": 1}
FACTORIZATION = {"name": "matrix_factorization", "dim": 3, "depth": 3, "rank": 2}


def build(name: str, lr: float, problem=PROBLEM, spectrum=None, **options):
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": [name],
        "problem": problem,
        "spectrum": spectrum or {"every": 0},
        name: options,
    }
    _, built, _, processes = prepare(table)
    return processes[name], built


def run(process, w0, steps):
    _, rows = process.advance(process.init(w0), steps)
    return {key: np.asarray(value) for key, value in rows.items()}


def optax_iterates(transform, grad, w0, steps):
    """w_0 .. w_{steps-1} of an optax transformation, written with optax's own init/update/apply."""
    state, w, out = transform.init(w0), w0, []
    for _ in range(steps):
        out.append(np.asarray(w))
        updates, state = transform.update(grad(w), state, w)
        w = optax.apply_updates(w, updates)
    return np.stack(out)


def numpy_iterates(grad, w0, steps, lr, b1, b2, eps, scalar=False, ema=True, bias=False):
    """The reference of the forms optax lacks (scalar RMSProp; Adam without bias correction)."""
    w, m, nu, out = np.asarray(w0), 0.0, 0.0, []
    for t in range(1, steps + 1):
        out.append(w)
        g = np.asarray(grad(jnp.asarray(w)))
        m = b1 * m + ((1 - b1) if ema else 1.0) * g
        nu = b2 * nu + (1 - b2) * (np.sum(g**2) if scalar else g**2)
        m_hat, nu_hat = (m / (1 - b1**t), nu / (1 - b2**t)) if bias else (m, nu)
        w = w - lr * m_hat / (np.sqrt(nu_hat) + eps)
    return np.stack(out)


CASES = {  # name, options, lr, optax transformation (None: the numpy reference); lrs below the edge, where
    # rounding differences are not amplified (scalar RMSProp at lr = 0.05 reaches 1e-3 by step 80 from 1e-16)
    "momentum classical": (
        "momentum",
        {"beta": 0.9, "form": "classical"},
        0.05,
        lambda lr: optax.sgd(lr, momentum=0.9),
    ),
    "momentum ema": (
        "momentum",
        {"beta": 0.8, "form": "ema"},
        0.2,
        lambda lr: optax.chain(optax.ema(0.8, debias=False), optax.scale(-lr)),
    ),
    "nesterov": ("nesterov", {"beta": 0.7}, 0.1, lambda lr: optax.sgd(lr, momentum=0.7, nesterov=True)),
    "rmsprop eps outside": (
        "rmsprop",
        {"beta2": 0.95, "eps": 1e-3},
        0.01,
        lambda lr: optax.rmsprop(lr, decay=0.95, eps=1e-3, eps_in_sqrt=False),
    ),
    "rmsprop eps inside": (
        "rmsprop",
        {"beta2": 0.9, "eps": 0.0, "eps_root": 1e-4},
        0.01,
        lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-4, eps_in_sqrt=True),
    ),
    "rmsprop bias-corrected": (
        "rmsprop",
        {"beta2": 0.9, "eps": 1e-6, "bias_correction": True},
        0.01,
        lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-6, eps_in_sqrt=False, bias_correction=True),
    ),
    "adam": (
        "adam",
        {"beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "eps_root": 1e-9},
        0.01,
        lambda lr: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-6, eps_root=1e-9),
    ),
    "scalar rmsprop": ("rmsprop", {"beta2": 0.9, "eps": 1e-4, "second_moment": "scalar"}, 0.02, None),
    "adam without bias correction": (
        "adam",
        {"beta1": 0.9, "beta2": 0.99, "eps": 1e-4, "bias_correction": False},
        0.002,
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_iterates_match_optax_to_1e12(case):
    name, options, lr, transform = CASES[case]
    process, problem = build(name, lr, **options)
    rows = run(process, problem.w0, 100)
    grad = eqx.filter_jit(problem.objective.grad)
    if transform is not None:
        expected = optax_iterates(transform(lr), grad, problem.w0, 100)
    else:
        scalar = options.get("second_moment") == "scalar"
        expected = numpy_iterates(
            grad,
            problem.w0,
            100,
            lr,
            options.get("beta1", 0.0),
            options["beta2"],
            options["eps"],
            scalar=scalar,
            ema=name == "adam",
            bias=False,
        )
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(rows["position"] - expected)) <= 1e-12 * scale
    assert np.linalg.norm(expected[-1] - expected[0]) > 0.1 * np.linalg.norm(expected[0])  # it moved
    np.testing.assert_allclose(rows["loss"], np.asarray(jax.vmap(problem.objective.value)(expected)), rtol=1e-12)
    # |w_{k+1} - 2 w_k + w_{k-1}| / 4 from the reference's own iterates
    second = 0.25 * np.linalg.norm(expected[2:] - 2 * expected[1:-1] + expected[:-2], axis=1)
    np.testing.assert_allclose(rows["oscillation"][1:-1], second, rtol=1e-9, atol=1e-14)
    assert np.isnan(rows["oscillation"][0])


@pytest.mark.parametrize(
    "name,options", [("adam", {"beta2": 0.9}), ("rmsprop", {"second_moment": "scalar"}), ("momentum", {"form": "ema"})]
)
def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h(name, options):
    """Every 5th step, the recorded top eigenvalues equal dense eigenvalues of P^{-1} H(w_k), with P
    rebuilt from the numpy reference's moments; edge_ratio divides by the optimizer's threshold."""
    lr = 0.01
    process, problem = build(
        name,
        lr,
        problem=FACTORIZATION,
        **options,
        spectrum={"every": 5, "k": 2, "k_max": 2, "tol": 1e-9, "max_iters": 200},
    )
    rows = run(process, problem.w0, 11)
    rule, state, w = process.rule, process.rule.init(problem.w0), problem.w0
    for step in range(11):
        np.testing.assert_allclose(rows["position"][step], np.asarray(w), rtol=1e-12, atol=1e-15)
        grad = problem.objective.grad(w)
        state = rule.moments(state, grad)
        p = np.asarray(rule.preconditioner(state, w))
        if step % 5 == 0:
            hessian = dense_hessian(problem.objective, w)
            dense = np.sort(np.linalg.eigvals(np.diag(1 / p) @ hessian).real)[::-1][:2]
            np.testing.assert_allclose(rows["eigenvalues"][step, :2], dense, rtol=1e-7)
            np.testing.assert_allclose(rows["edge_ratio"][step], dense[0] / rule.threshold(lr), rtol=1e-7)
        else:
            assert np.isnan(rows["preconditioned_sharpness"][step])
        w = w - lr * rule.direction(state, grad) / p


@pytest.mark.parametrize(
    "name,options,lr",
    [
        ("rmsprop", {"beta2": 0.99, "eps": 1e-3, "bias_correction": True}, 0.01),
        ("adam", {"beta1": 0.5, "beta2": 0.99, "eps": 1e-3}, 0.03),
    ],
)
def test_optimizer_warm_started_at_its_edge_measures_the_dense_eigenvalues_at_every_step(name, options, lr):
    """At the optimizer's edge (a small MLP, float64), with the default (fitted) warm start: at every step
    the two tracked eigenvalues are the top two of P^{-1} H(w_k) by dense eig, every residual is within tol,
    the iterates are those of a run without measurement, bit for bit, and the start spends fewer HVPs
    than starting from the previous step's vectors (the iterates bounce: step t - 2's are the closer)."""
    steps, spectrum = 40, {"every": 1, "k": 2, "k_max": 2, "tol": 1e-4, "max_iters": 200}
    process, problem = build(name, lr, spectrum=spectrum, **options)
    rows = run(process, problem.w0, steps)
    off = run(build(name, lr, **options)[0], problem.w0, steps)
    previous = run(build(name, lr, spectrum=spectrum, warm_start="previous", **options)[0], problem.w0, steps)
    np.testing.assert_array_equal(rows["position"], off["position"])
    assert np.mean(rows["edge_ratio"] >= 0.95) >= 0.5  # at the edge most of the time
    assert np.all(rows["residual"] <= 1e-4)
    rule, state = process.rule, process.rule.init(problem.w0)
    for step in range(steps):
        w = jnp.asarray(rows["position"][step])
        state = rule.moments(state, problem.objective.grad(w))
        scale = 1 / np.sqrt(np.asarray(rule.preconditioner(state, w)))  # P^{-1/2} H P^{-1/2}: P^{-1} H's spectrum
        dense = np.linalg.eigvalsh(scale[:, None] * dense_hessian(problem.objective, w) * scale)[::-1][:2]
        np.testing.assert_allclose(rows["eigenvalues"][step, :2], dense, rtol=1e-6, err_msg=f"step {step}")
    assert rows["measurement_hvps"][10:].sum() < 0.95 * previous["measurement_hvps"][10:].sum()
    np.testing.assert_array_equal(rows["hvps"], rows["measurement_hvps"])  # the optimizer spends none of its own


def test_gd_records_its_edge_ratio():
    process, problem = build("gd", 0.1, problem=FACTORIZATION, spectrum={"every": 1})
    rows = run(process, problem.w0, 3)
    np.testing.assert_allclose(rows["edge_ratio"], 0.1 * rows["sharpness"] / 2, rtol=1e-12)


def test_thresholds_from_the_rules():
    from eosflow.optim.adaptive import (
        AdamOptions,
        MomentumOptions,
        NesterovOptions,
        RMSPropOptions,
    )

    assert AdamOptions().rule().threshold(0.01) == pytest.approx(3800.0)
    assert MomentumOptions(beta=0.5).rule().threshold(0.1) == pytest.approx(30.0)
    assert MomentumOptions(beta=0.5, form="ema").rule().threshold(0.1) == pytest.approx(60.0)
    assert NesterovOptions(beta=0.5).rule().threshold(0.1) == pytest.approx(15.0)
    assert RMSPropOptions().rule().threshold(0.1) == pytest.approx(20.0)


def test_bad_hyperparameters_name_the_field():
    with pytest.raises(SpecError, match="adam.beta1"):
        build("adam", 0.01, beta1=1.0)
    with pytest.raises(SpecError, match="momentum.form"):
        build("momentum", 0.01, form="heavy")
    with pytest.raises(SpecError, match="rmsprop.second_moment"):
        build("rmsprop", 0.01, second_moment="full")
