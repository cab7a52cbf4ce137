"""The problem zoo: derivatives against finite differences, closed forms, and short runs of each."""

import tomllib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow
from eosflow.config import SpecError, describe_fields
from eosflow.experiment import run
from eosflow.problems import PROBLEMS, build_problem, describe_problems
from eosflow.problems.networks import split_meanfield

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# small, float64-friendly instances of every problem (and several variants of some)
CASES = {
    "quadratic": {"name": "quadratic"},
    "quartic_3d": {"name": "quartic", "dim": 3, "init": 0.5},
    "sharp_valley": {"name": "sharp_valley"},
    "sharp_valley_quadratic": {
        "name": "sharp_valley",
        "profile": "quadratic",
        "drift": "quadratic",
        "target": 1.0,
        "transverse": [1.0, 0.5],
        "x0": 0.7,
        "bend": -0.4,
    },
    "factorization_deep": {"name": "matrix_factorization", "dim": 3, "depth": 3, "rank": 2},
    "factorization_shallow_mean": {
        "name": "matrix_factorization",
        "dim": 4,
        "depth": 2,
        "rank": 2,
        "reduction": "mean",
    },
    "factorization_scalar": {"name": "matrix_factorization", "dim": 1, "depth": 4, "init": "identity"},
    "mlp_tanh": {"name": "mlp", "n_train": 20, "n_test": 10, "width": 8},
    "mlp_relu_ce": {
        "name": "mlp",
        "n_train": 20,
        "n_test": 0,
        "width": 8,
        "activation": "relu",
        "loss": "cross_entropy",
    },
    "mlp_gelu_nobias": {
        "name": "mlp",
        "n_train": 20,
        "n_test": 0,
        "width": 8,
        "depth": 1,
        "activation": "gelu",
        "bias": False,
    },
    "mlp_swish_teacher": {
        "name": "mlp",
        "dataset": "teacher",
        "classes": 3,
        "n_train": 12,
        "n_test": 0,
        "width": 6,
        "depth": 3,
        "activation": "swish",
        "input_dim": 5,
    },
    "mlp_regression": {"name": "mlp_regression", "n_train": 16},
    "cnn": {"name": "cnn", "n_train": 20, "n_test": 10, "channels": [3, 4]},
    "two_layer_meanfield": {"name": "two_layer_meanfield", "width": 16, "n_train": 24},
}
# the architectures suite (tests/test_architectures.py adds third derivatives and more variants)
ARCHITECTURE_CASES = {
    "resnet_layer_relu": {"name": "resnet", "n_train": 6, "classes": 3, "channels": [2, 4]},
    "resnet_none_swish_ce": {
        "name": "resnet",
        "n_train": 6,
        "classes": 3,
        "channels": [2, 4],
        "norm": "none",
        "activation": "swish",
        "loss": "cross_entropy",
    },
    "resnet_group_tanh_two_blocks": {
        "name": "resnet",
        "n_train": 4,
        "classes": 2,
        "channels": [4],
        "blocks": 2,
        "norm": "group",
        "groups": 2,
        "activation": "tanh",
    },
    "vit_gelu": {
        "name": "vit",
        "n_train": 6,
        "classes": 3,
        "dim": 4,
        "heads": 2,
        "mlp_width": 6,
        "depth": 1,
        "patch": 4,
    },
    "transformer_sorting": {"name": "transformer", "n_train": 6, "length": 3, "vocab": 3, "dim": 4, "mlp_width": 6},
    "transformer_copying_ce": {
        "name": "transformer",
        "task": "copying",
        "n_train": 6,
        "length": 2,
        "vocab": 3,
        "dim": 4,
        "heads": 1,
        "mlp_width": 5,
        "depth": 1,
        "loss": "cross_entropy",
    },
    "lstm_copying": {"name": "lstm", "n_train": 6, "length": 2, "vocab": 3, "hidden": 4, "embedding": 3},
    "lstm_sorting_ce": {
        "name": "lstm",
        "task": "sorting",
        "n_train": 5,
        "length": 3,
        "vocab": 4,
        "hidden": 3,
        "embedding": 2,
        "loss": "cross_entropy",
    },
    "mlp_moons": {"name": "mlp", "dataset": "moons", "classes": 2, "n_train": 10, "n_test": 4, "width": 6},
    "mlp_circles_ce": {
        "name": "mlp",
        "dataset": "circles",
        "classes": 2,
        "n_train": 10,
        "n_test": 0,
        "width": 5,
        "activation": "relu",
        "loss": "cross_entropy",
    },
}
CASES.update(ARCHITECTURE_CASES)
# problems registered elsewhere are checked with their defaults
CASES.update({name: {"name": name} for name in PROBLEMS if name not in {c["name"] for c in CASES.values()}})


@eqx.filter_jit
def dense_hessian(objective, w):
    return objective.hessian(w)


# L, g and H v compiled once each and called at every point: one program holding the two values, three
# gradients and the HVP compiled each gradient graph three times (~2x the compile time of the file's
# slowest cases, the transformer's and the ViT's)
_value = eqx.filter_jit(lambda objective, w: objective.value(w))
_grad = eqx.filter_jit(lambda objective, w: objective.grad(w))
_hvp = eqx.filter_jit(lambda objective, w, v: objective.hvp(w, v))


def _derivatives(objective, w, v, h):
    """(g.v, H v) and their central differences with step h along v."""
    value_fd = (_value(objective, w + h * v) - _value(objective, w - h * v)) / (2 * h)
    hvp_fd = (_grad(objective, w + h * v) - _grad(objective, w - h * v)) / (2 * h)
    grad = _grad(objective, w)
    return grad, grad @ v, value_fd, _hvp(objective, w, v), hvp_fd


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_and_hvp_match_finite_differences(case):
    problem, _ = build_problem(CASES[case], 0, "float64")
    rng = np.random.default_rng(1)
    d = problem.w0.size
    w = problem.w0 + 0.05 * jnp.asarray(rng.standard_normal(d)) / np.sqrt(d)
    v = jnp.asarray(rng.standard_normal(d))
    v = v / jnp.linalg.norm(v)
    grad, gv, gv_fd, hv, hv_fd = _derivatives(problem.objective, w, v, 1e-5)
    assert abs(gv - gv_fd) <= 1e-7 * max(1.0, float(jnp.linalg.norm(grad)))
    assert float(jnp.linalg.norm(hv - hv_fd)) <= 1e-6 * max(1.0, float(jnp.linalg.norm(hv)))
    assert float(jnp.linalg.norm(hv)) > 0


ONE_CASE_PER_PROBLEM = {case["name"]: case for case in reversed(CASES.values())}


@pytest.mark.parametrize("name", sorted(ONE_CASE_PER_PROBLEM))
def test_every_problem_runs_a_few_steps(name, tmp_path):
    case = ONE_CASE_PER_PROBLEM[name]
    table = {"steps": 3, "lr": 0.01, "dtype": "float64", "processes": ["gd"], "spectrum": {"every": 0}, "problem": case}
    outcome = run(table, tmp_path / "run", overwrite=True)
    assert outcome.status == "completed" and outcome.steps_done == 3
    ds = eosflow.load(tmp_path / "run")
    loss = ds.loss.sel(process="gd").values
    assert np.all(np.isfinite(loss)) and loss.shape == (3,)
    problem, _ = build_problem(case, 0, "float64")
    np.testing.assert_allclose(loss[0], float(problem.objective.value(problem.w0)), rtol=1e-12)


# ---- sizes ------------------------------------------------------------------------------------
def test_central_flow_reference_example_has_484_parameters():
    table = tomllib.loads((EXAMPLES / "central_flow_reference.toml").read_text())
    assert table["lr"] == 0.1 and table["processes"] == ["gd"]
    problem, params = build_problem(table["problem"], table["seed"], table["dtype"])
    sizes = [8, 16, 16, 4]
    expected = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    assert expected == 484 and problem.w0.size == 484
    inputs, targets = problem.objective.data
    assert inputs.shape == (128, 8) and targets.shape == (128, 4)
    # loss = mean over examples of the summed squared error
    residual = problem.objective.loss_on.model(problem.objective.unravel(problem.w0), inputs) - targets
    np.testing.assert_allclose(problem.objective.value(problem.w0), np.mean(np.sum(np.asarray(residual) ** 2, 1)))


@pytest.mark.parametrize("width, depth, bias", [(8, 1, True), (5, 3, True), (7, 2, False)])
def test_mlp_parameter_count(width, depth, bias):
    problem, _ = build_problem(
        {
            "name": "mlp",
            "dataset": "iris",
            "classes": 3,
            "n_train": 9,
            "n_test": 0,
            "width": width,
            "depth": depth,
            "bias": bias,
        },
        0,
        "float64",
    )
    sizes = [4] + [width] * depth + [3]
    assert problem.w0.size == sum(a * b + (b if bias else 0) for a, b in zip(sizes[:-1], sizes[1:]))


def test_cnn_parameter_count_and_image_checks():
    problem, _ = build_problem(
        {"name": "cnn", "n_train": 10, "n_test": 0, "channels": [3, 5], "kernel": 3}, 0, "float64"
    )
    convs = (3 * 3 * 1 * 3 + 3) + (3 * 3 * 3 * 5 + 5)
    readout = 5 * 2 * 2 * 10 + 10  # 8x8 -> 4x4 -> 2x2
    assert problem.w0.size == convs + readout
    with pytest.raises(SpecError, match="not an image dataset"):
        build_problem({"name": "cnn", "dataset": "iris", "classes": 3, "n_train": 9, "n_test": 0}, 0, "float64")
    with pytest.raises(SpecError, match="problem.channels"):
        build_problem({"name": "cnn", "n_train": 10, "channels": [2, 2, 2, 2]}, 0, "float64")


def test_network_initialization_is_uniform_within_one_over_sqrt_fan_in():
    problem, _ = build_problem({"name": "mlp", "n_train": 10, "n_test": 0, "width": 64}, 3, "float64")
    first = np.asarray(problem.objective.unravel(problem.w0).layers[0].weight)
    assert first.shape == (64, 64)
    bound = 1 / np.sqrt(64)
    assert np.abs(first).max() <= bound and np.abs(first).max() > 0.99 * bound
    np.testing.assert_allclose(first.std(), bound / np.sqrt(3), rtol=0.05)
    again, _ = build_problem({"name": "mlp", "n_train": 10, "n_test": 0, "width": 64}, 3, "float64")
    np.testing.assert_array_equal(again.w0, problem.w0)


# ---- closed forms -----------------------------------------------------------------------------
def test_meanfield_layout_and_output_match_the_formula():
    problem, _ = build_problem({"name": "two_layer_meanfield", "width": 7, "n_train": 11, "input_dim": 3}, 0, "float64")
    w = np.asarray(problem.w0) + np.random.default_rng(0).standard_normal(problem.w0.size)
    a, weights = w[:7], w[7:].reshape(7, 3)
    x, y = (np.asarray(leaf) for leaf in problem.objective.data)
    f = np.tanh(x @ weights.T) @ a / 7
    np.testing.assert_allclose(problem.objective.value(jnp.asarray(w)), 0.5 * np.mean((f - y[:, 0]) ** 2), rtol=1e-12)
    split_a, split_w = split_meanfield(jnp.asarray(w), 7)
    np.testing.assert_array_equal(split_a, a)
    np.testing.assert_array_equal(split_w, weights)
    with pytest.raises(SpecError, match="problem.dataset"):
        build_problem({"name": "two_layer_meanfield", "dataset": "linnerud", "n_train": 10}, 0, "float64")


def test_scalar_deep_product_is_the_degenerate_factorization():
    problem, _ = build_problem(
        {"name": "matrix_factorization", "dim": 1, "depth": 3, "target_scale": 2.0}, 0, "float64"
    )
    w = np.array([0.7, -1.3, 2.1])
    np.testing.assert_allclose(problem.objective.value(jnp.asarray(w)), 0.5 * (np.prod(w) - 2.0) ** 2, rtol=1e-12)


def test_balanced_factorization_minimum_has_sharpness_L_s_to_the_2_L_minus_1_over_L():
    """At W_1 = c q v^T, W_l = c q q^T, W_L = c u q^T (c = s^(1/L)) the product is s u v^T; H = J^T J."""
    depth, s = 3, 2.5
    problem, _ = build_problem(
        {"name": "matrix_factorization", "dim": 2, "depth": depth, "target_scale": s}, 0, "float64"
    )
    target = np.asarray(problem.objective.loss_on.fn.target)
    u, sv, vt = np.linalg.svd(target)
    assert np.isclose(sv[0], s) and np.isclose(sv[1], 0)
    q, c = np.array([0.6, 0.8]), s ** (1 / depth)
    factors = [c * np.outer(q, vt[0]), c * np.outer(q, q), c * np.outer(u[:, 0], q)]
    w = jnp.asarray(np.concatenate([f.ravel() for f in factors]))
    assert float(problem.objective.value(w)) < 1e-20
    top = np.linalg.eigvalsh(np.asarray(dense_hessian(problem.objective, w)))[-1]
    np.testing.assert_allclose(top, depth * s ** (2 * (depth - 1) / depth), rtol=1e-10)
    with pytest.raises(SpecError, match="problem.rank"):
        build_problem({"name": "matrix_factorization", "dim": 2, "rank": 3}, 0, "float64")


@pytest.mark.parametrize("profile, x, bend", [("exp", 0.4, 0.0), ("exp", -0.3, 1.5), ("quadratic", 0.8, -0.7)])
def test_sharp_valley_sharpness_along_the_floor(profile, x, bend):
    """With eps = 0, on the floor y = bend x^2/2 the Hessian is s(x) v v^T, v = (-bend x, 1)."""
    params = {"name": "sharp_valley", "profile": profile, "sharpness": 3.0, "rate": 0.7, "bend": bend, "eps": 0.0}
    problem, _ = build_problem(params, 0, "float64")
    s = 3.0 * (np.exp(0.7 * x) if profile == "exp" else 1 + 0.7 * x**2)
    eigenvalues = np.linalg.eigvalsh(np.asarray(dense_hessian(problem.objective, jnp.array([x, 0.5 * bend * x**2]))))
    np.testing.assert_allclose(eigenvalues, [0.0, s * (1 + (bend * x) ** 2)], atol=1e-12)
    with pytest.raises(SpecError, match="problem.transverse"):
        build_problem({"name": "sharp_valley", "transverse": [1.0, -2.0]}, 0, "float64")


@pytest.mark.parametrize("lr", [0.1, 0.125])
def test_sharp_valley_gd_self_stabilizes_at_2_over_lr(lr):
    """The drift pushes GD up the sharpness profile; GD's sharpness then hovers at 2/lr (dense eigh)."""
    problem, _ = build_problem({"name": "sharp_valley"}, 0, "float64")
    objective = problem.objective

    @jax.jit
    def trajectory(w):
        def step(w, _):
            return w - lr * objective.grad(w), jnp.linalg.eigvalsh(objective.hessian(w))[-1]

        return jax.lax.scan(step, w, None, length=2500)[1]

    sharpness = np.asarray(trajectory(problem.w0))
    assert sharpness[0] < 0.5 * 2 / lr  # starts far below the threshold ...
    assert abs(sharpness[-1000:].mean() * lr / 2 - 1) < 0.02  # ... and ends hovering at it


# ---- the quartic's period-2 orbit ----------------------------------------------------------------
@pytest.mark.parametrize("lr, dim", [(0.08, 1), (0.09, 1), (0.085, 3)])
def test_quartic_gd_settles_on_the_predicted_period_two_orbit(lr, dim, tmp_path):
    S, Q = 30.0, 2.0
    table = {
        "steps": 300,
        "lr": lr,
        "dtype": "float64",
        "processes": ["gd"],
        "record": {"params_every": 1},
        "problem": {"name": "quartic", "sharpness": S, "quartic": Q, "dim": dim},
    }
    assert run(table, tmp_path / "q", overwrite=True).status == "completed"
    _, w = eosflow.load_params(tmp_path / "q", "gd")
    amplitude = np.sqrt((S - 2 / lr) / Q)  # lr (S - Q a^2) = 2
    np.testing.assert_allclose(np.linalg.norm(w[-20:], axis=1), amplitude, rtol=1e-9)
    np.testing.assert_allclose(w[-1], -w[-2], atol=1e-9 * amplitude)  # +-a: a period-2 flip
    # on the orbit the radial curvature is S - 3 Q a^2 = 6/lr - 2S; tangential ones are S - Q a^2 = 2/lr
    expected = 6 / lr - 2 * S if dim == 1 else max(6 / lr - 2 * S, 2 / lr)
    sharpness = eosflow.load(tmp_path / "q").sharpness.sel(process="gd").values[-1]
    np.testing.assert_allclose(sharpness, expected, rtol=1e-3)
    assert lr * S > 2 and lr * S < 3


def test_quartic_orbit_is_unstable_beyond_lr_S_3():
    """For lr S > 3 the two-step multiplier (2 lr S - 5)^2 exceeds 1: GD leaves the orbit +-a."""
    S, Q, lr = 30.0, 1.0, 0.105
    problem, _ = build_problem({"name": "quartic", "sharpness": S, "quartic": Q}, 0, "float64")
    amplitude = np.sqrt((S - 2 / lr) / Q)
    grad = jax.jit(problem.objective.grad)
    w = jnp.array([amplitude * (1 + 1e-6)])
    for _ in range(60):
        w = w - lr * grad(w)
    assert abs(abs(float(w[0])) - amplitude) > 1e-3 * amplitude


# ---- listing and examples ----------------------------------------------------------------------
def test_describe_problems_lists_every_problem_and_parameter():
    text = describe_problems()
    for name, entry in PROBLEMS.items():
        assert f"{name}:" in text
        for field, default, _ in describe_fields(entry.options):
            assert f"{field} = {default}" in text
    for dataset in ("digits", "iris", "wine", "breast_cancer", "cifar10", "teacher", "gaussian", "diabetes"):
        assert dataset in text


@pytest.mark.parametrize("example", ["matrix_factorization_eos.toml", "sharp_valley.toml"])
def test_examples_build(example):
    table = tomllib.loads((EXAMPLES / example).read_text())
    problem, _ = build_problem(table["problem"], table["seed"], table["dtype"])
    assert np.isfinite(float(problem.objective.value(problem.w0)))
    if example.startswith("matrix"):
        assert (table["problem"]["dim"], table["problem"]["depth"], table["lr"]) == (2, 3, 0.077)
        assert problem.w0.size == 3 * 2 * 2


def test_a_problem_prints_its_shapes_not_its_values():
    """repr(Problem) is one line of shapes and dtypes, whatever the problem's size (the dataclass's own repr printed
    every entry of w0 and the model's whole structure)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 10)), jnp.float32), "b": jnp.zeros(10, jnp.float32)}
    inputs, targets = (jnp.asarray(rng.normal(size=(500, n)), jnp.float32) for n in (64, 10))
    problem = eosflow.Problem.from_model(lambda p, x: x @ p["w"] + p["b"], params, inputs, targets)
    expected = "Problem(w0=f32[650](numpy), params={'b': f32[10], 'w': f32[64,10]}, data=(f32[500,64], f32[500,10])"
    assert repr(problem) == expected + ")"
    assert repr(problem.with_microbatch(100)) == expected + ", microbatch=100)"
    mlp, _ = build_problem({"name": "mlp", "width": 512}, 0, "float32")
    assert mlp.w0.size == 301_066
    assert repr(mlp) == (
        "Problem(w0=f32[301066](numpy), params=<6 leaves>, data=(f32[500,64], f32[500,10]), test_data=(f32[300,64], "
        "f32[300,10]), accuracy=accuracy_of, num_classes=10, info={'dataset': 'digits', 'n_train': 500, 'n_test': "
        "300, 'parameters': 301066})"
    )
