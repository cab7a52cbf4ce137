"""The integrator (flows/integrate.py) and the process wrapper (flows/flow.py), against closed forms,
and the worked example of docs/architecture.md run as written."""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm

from eosflow.experiment import prepare
from eosflow.flows.integrate import Averaged, Growth, euler, exact, integrate, rk4
from eosflow.process import PROCESSES

A = np.array([[3.0, 1.0], [1.0, 2.0]])


def linear_field(z):
    return jnp.asarray(-A) @ z, z


@pytest.mark.parametrize("update, order", [(euler, 1), (rk4, 4)])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_integrate_is_the_update_applied_n_times(update, order, n):
    """z' = -A z: Euler gives (I - A/n)^n z0, RK4 the degree-4 Taylor polynomial of e^(-A/n), to the n-th
    power; aux is the field's at the start; a traced n gives the same result as a Python int."""
    z0 = jnp.asarray([1.0, -0.5])
    step = sum(np.linalg.matrix_power(-A / n, j) / np.prod(range(1, j + 1)) for j in range(order + 1))
    expected = np.linalg.matrix_power(step, n) @ np.asarray(z0)
    z1, aux = integrate(linear_field, z0, n, update)
    np.testing.assert_allclose(z1, expected, rtol=1e-13)
    np.testing.assert_array_equal(aux, z0)
    traced, _ = jax.jit(lambda m: integrate(linear_field, z0, m, update))(jnp.asarray(n))
    np.testing.assert_allclose(traced, z1, rtol=1e-14)
    if n == 8:  # h |lambda| <= 0.45: close to the exact flow, RK4 much closer than Euler
        error = np.linalg.norm(z1 - expm(-A) @ np.asarray(z0)) / np.linalg.norm(expm(-A) @ np.asarray(z0))
        assert error < (3e-4 if update is rk4 else 0.3)  # measured 1.2e-4 and 0.13


@pytest.mark.parametrize("update", [euler, rk4])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_averaged_aux_is_the_mean_over_the_substeps(update, n):
    """An Averaged aux node is the left Riemann mean of its values at the n substep starts (Euler's
    iterates (I - A/n)^i z0 here); the other aux stays the start's; a traced n gives the same."""

    def field(z):
        return jnp.asarray(-A) @ z, (z, Averaged(z), Averaged(2.0 * z[0]))

    z0 = jnp.asarray([1.0, -0.5])
    starts = []
    z = np.asarray(z0)
    for _ in range(n):
        starts.append(z)
        z = np.asarray(update(lambda x: (jnp.asarray(-A) @ x, None), jnp.asarray(z), 1.0 / n)[0])
    mean = np.mean(starts, axis=0)
    for z1, (start, averaged, scalar) in (
        integrate(field, z0, n, update),
        jax.jit(lambda m: integrate(field, z0, m, update))(jnp.asarray(n)),
    ):
        np.testing.assert_allclose(z1, z, rtol=1e-13)
        np.testing.assert_array_equal(start, z0)
        assert isinstance(averaged, Averaged)
        np.testing.assert_allclose(averaged.value, mean, rtol=1e-13)
        np.testing.assert_allclose(scalar.value, 2.0 * mean[0], rtol=1e-13)


def test_exact_update_steps_growth_leaves_exactly():
    """d log m/dt = r: m e^r after any n; with a source s, a^2 gains h s per substep after growing."""
    rate, n = -0.7, 5

    def field(z):
        x = z[0]
        return (-x, Growth(jnp.asarray(rate)), Growth(jnp.asarray(rate), jnp.asarray(0.3))), None

    z0 = (jnp.asarray(2.0), jnp.asarray(1.5), jnp.asarray(0.2))
    (x, m, a), _ = integrate(field, z0, n, exact)
    np.testing.assert_allclose(x, 2.0 * (1 - 1 / n) ** n, rtol=1e-14)
    np.testing.assert_allclose(m, 1.5 * np.exp(rate), rtol=1e-14)
    square = 0.2**2
    for _ in range(n):
        square = square * np.exp(2 * rate / n) + 0.3 / n
    np.testing.assert_allclose(a, np.sqrt(square), rtol=1e-14)


def test_keys_are_one_per_substep():
    """With a key, substep i gets jax.random.split(key, n)[i]."""
    key, n = jax.random.PRNGKey(3), 4

    def draw(field, z, h, k):
        return z + jax.random.normal(k), None

    z1, _ = integrate(None, jnp.asarray(0.0), n, draw, key)
    expected = sum(float(jax.random.normal(k)) for k in jax.random.split(key, n))
    np.testing.assert_allclose(z1, expected, rtol=1e-14)


def worked_example() -> str:
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = text.split("### Worked example")[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_worked_example_of_the_architecture_page():
    """The page's model, registered as written: on L = 1/2 w^T A w one step is P(-M/n)^n w with
    M = eta (A + eta/2 A^2) and P the degree-4 Taylor polynomial of exp (RK4, closed form), and at a fixed
    physical time its distance to GD shrinks like eta^2 (GD's modified equation), gradient flow's like eta."""
    exec(compile(worked_example(), "docs/architecture.md", "exec"), {})  # noqa: S102  (the page's own code)
    try:
        problem = {"name": "quadratic", "eigenvalues": [4.0, 1.0], "rotate": True}
        errors = {}
        for lr in (0.05, 0.025):
            steps = round(1.0 / lr)
            table = {
                "lr": lr,
                "dtype": "float64",
                "problem": problem,
                "spectrum": {"k": 1, "k_max": 1},
                "processes": ["gd", "gradient_flow", "modified_gradient_flow"],
            }
            _, built, _, processes = prepare(table)
            hessian = np.asarray(built.objective.hessian(built.w0))
            finals = {}
            for name, process in processes.items():
                _, rows = process.advance(process.init(built.w0), steps + 1)
                finals[name] = np.asarray(rows["position"][-1])
                if name == "modified_gradient_flow":
                    n = int(rows["substeps"][0])
                    M = lr * (hessian + 0.5 * lr * hessian @ hessian)
                    step = sum(np.linalg.matrix_power(-M / n, j) / np.prod(range(1, j + 1)) for j in range(5))
                    one = np.linalg.matrix_power(step, n) @ np.asarray(built.w0)
                    np.testing.assert_allclose(rows["position"][1], one, rtol=1e-12)
            for name in ("gradient_flow", "modified_gradient_flow"):
                errors[lr, name] = np.linalg.norm(finals[name] - finals["gd"])
        assert errors[0.05, "modified_gradient_flow"] / errors[0.025, "modified_gradient_flow"] > 3.0
        assert errors[0.05, "gradient_flow"] / errors[0.025, "gradient_flow"] < 2.5
    finally:
        PROCESSES.pop("modified_gradient_flow", None)


def test_a_flow_starts_its_eigensolver_from_the_fitted_extrapolation_of_its_last_measurements():
    """A flow's centre does not bounce: at every step its measurement starts from the last measured vectors
    moved on by their fitted change (tracker.fitted_extrapolation of the last three), spends what LOBPCG
    from there spends, reports dense eigh's eigenvalues, and costs less over the run than a start from the
    last measurement alone (gradient flow sharpening on a small MLP, float64)."""
    from eosflow.spec import SpectrumSpec
    from eosflow.spectrum import dense_top_eigenpairs, value_grad_and_tracked
    from eosflow.tracker import fitted_extrapolation

    table = {
        "lr": 0.5,
        "dtype": "float64",
        "problem": {"name": "mlp", "width": 8, "n_train": 40, "n_test": 0},
        "spectrum": {"k": 2, "k_max": 2, "tol": 1e-6, "max_iters": 200},
        "processes": ["gradient_flow"],
    }
    _, built, _, processes = prepare(table)
    flow = processes["gradient_flow"]
    spectrum = SpectrumSpec(**table["spectrum"])
    step = jax.jit(lambda s: flow.step(s))
    spent = jax.jit(lambda w, start, t: value_grad_and_tracked(flow.objective, w, start, t, spectrum)[1].hvps)
    state, fitted, previous = flow.init(built.w0), [], []
    assert flow.position(state.z).shape == np.shape(built.w0)  # a NumPy w0 is the position too
    for t in range(25):
        start = fitted_extrapolation(state.vectors, state.older[0], state.older[1])
        state, row = step(state)
        w = row["position"]  # where the step measured
        fitted.append(int(row["measurement_hvps"]))
        assert fitted[-1] == int(spent(w, start, jnp.asarray(t)))
        previous.append(int(spent(w, state.older[0], jnp.asarray(t))))
        oracle = dense_top_eigenpairs(flow.objective, w, k=2).values
        np.testing.assert_allclose(np.asarray(row["eigenvalues"][:2]), oracle, rtol=1e-9, err_msg=f"step {t}")
    assert sum(fitted[3:]) < 0.9 * sum(previous[3:])


@pytest.mark.parametrize(
    "process, tables",
    [
        ("gradient_flow", {}),
        ("gradient_flow", {"gradient_flow": {"method": "rk4"}}),
        ("adam_stable_flow", {}),
        ("rmsprop_central_flow", {"rmsprop": {"eps": 0.1}}),  # below its edge: free steps
        ("free_energy", {}),
        ("langevin", {"langevin": {"batch_size": 4}}),
    ],
)
def test_a_measured_flow_step_evaluates_the_model_no_more_often_than_an_unmeasured_one(process, tables):
    """A flow's (L, g) at the position, where its first substep (or its seed, or its force) starts, is the primal
    of the linearization its eigensolver's HVPs come from (``Measured.value``): a step that measures three pairs
    runs the model's forward pass exactly as often as the next one, which measures none (``spectrum.every = 2``:
    the same substep count, from the carried sharpness), counted at run time by a callback inside the model (a
    ``lax.cond`` branch not taken does not run it; counting traces would count both branches). Before, the field
    evaluated the gradient at the position again: one forward pass more on the measured step."""
    import equinox as eqx

    import eosflow

    calls = [0]

    def bump():
        calls[0] += 1

    def model(params, inputs):
        jax.debug.callback(bump)
        return jnp.tanh(inputs @ params["a"]) @ params["b"]

    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 5)) / 2), "b": jnp.asarray(rng.normal(size=(5, 2)) / 2)}
    inputs, targets = jnp.asarray(rng.normal(size=(20, 3))), jnp.asarray(rng.normal(size=(20, 2)))
    problem = eosflow.Problem.from_model(model, params, inputs, targets)
    table = {"lr": 0.01, "dtype": "float64", "steps": 4, "processes": [process], **tables}
    flow = prepare({**table, "spectrum": {"k": 3, "k_max": 3}}, problem)[3][process]
    flow = dataclasses.replace(flow, spectrum=dataclasses.replace(flow.spectrum, every=2))  # free_energy: set by hand
    state, counted = flow.init(problem.w0), {}
    step = eqx.filter_jit(lambda flow, state: flow.step(state))
    for t in range(4):  # steps 0 and 1 compile and warm up; 2 measures, 3 does not
        calls[0] = 0
        state, row = step(flow, state)
        jax.block_until_ready(row)
        jax.effects_barrier()
        counted[t] = calls[0], int(row.get("substeps", 0)), int(row["measurement_hvps"])
    assert counted[2][2] > 0 and counted[3][2] == 0, counted  # step 2 measured, step 3 not
    assert counted[2][:2] == counted[3][:2], counted
