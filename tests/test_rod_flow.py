"""Rod flow against closed forms, dense float64 eigendecompositions and the GD iterates themselves.

Shared checks of the centre (below the edge of stability both rod-like models follow GD's
modified equation) are parametrized over ``rod_flow`` and ``edge_flow``.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.config import SpecError
from eosflow.experiment import prepare
from eosflow.objective import Objective
from eosflow.spec import SpectrumSpec


def build(process: str, problem: dict, lr: float, **options):
    """The process named ``process`` and its problem, from a float64 spec with no spectrum."""
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": [process],
        "problem": problem,
        "spectrum": {"every": 0},
        process: options,
    }
    _, built, _, processes = prepare(table)
    return processes[process], built


def advance(process, w0, steps):
    state = process.init(w0)
    state, rows = process.advance(state, steps)
    return state, {key: np.asarray(value) for key, value in rows.items()}


def gd_path(objective, w0, lr, steps):
    """w_0, ..., w_steps of plain gradient descent (written here, independent of eosflow.optim); traceable."""

    def body(w, _):
        new = w - lr * objective.grad(w)
        return new, new

    _, ws = jax.lax.scan(body, w0, None, length=steps)
    return jnp.concatenate([w0[None], ws])


def gd_iterates(objective, w0, lr, steps):
    return np.asarray(gd_path(objective, jnp.asarray(w0), lr, steps))


# ---- linear stability: the rod grows exactly when eta * S > 2 ------------------------------------


def test_linearized_rod_field_is_eta_hessian_minus_two():
    """d(dr/dt)/dr at a tiny rod = eta H(x) - 2 I, whose top eigenvalue eta S - 2 changes sign at eta S = 2."""
    process, problem = build("rod_flow", {"name": "quartic", "sharpness": 10.0, "dim": 4, "init": 0.3}, 0.2)
    centre = problem.w0
    rod = 1e-7 * jnp.asarray(np.random.default_rng(0).standard_normal(centre.size))
    jacobian = np.asarray(jax.jacfwd(lambda r: process.field((centre, r))[0][1])(rod))
    hessian = np.asarray(jax.jit(jax.hessian(problem.objective.value))(centre))
    np.testing.assert_allclose(jacobian, process.lr * hessian - 2.0 * np.eye(centre.size), atol=1e-8)
    sharpness = np.linalg.eigvalsh(hessian)[-1]
    for lr in (0.999 * 2 / sharpness, 1.001 * 2 / sharpness):
        top_rate = np.linalg.eigvalsh(lr * hessian - 2.0 * np.eye(centre.size))[-1]
        assert np.sign(top_rate) == np.sign(lr * sharpness - 2.0)


@pytest.mark.parametrize("lr_sharpness", [1.9, 1.99, 2.01, 2.1])
def test_rod_growth_on_a_quadratic_switches_sign_at_two(lr_sharpness):
    """Along the top eigenvector the rod's length multiplies by (1 + (eta S - 2)/n)^n per step, and
    grows exactly when GD's oscillation (multiplier |1 - eta S|) does."""
    eigenvalues = (10.0, 4.0, 1.0)
    lr = lr_sharpness / eigenvalues[0]
    process, problem = build("rod_flow", {"name": "quadratic", "eigenvalues": list(eigenvalues)}, lr, substeps=4)
    _, rows = advance(process, problem.w0, 60)
    growth = rows["amplitude"][-1] / rows["amplitude"][-2]
    np.testing.assert_allclose(growth, (1 + (lr_sharpness - 2) / 4) ** 4, rtol=1e-6)
    top = np.linalg.eigh(np.asarray(problem.objective.hessian(problem.w0)))[1][:, -1]
    along = gd_iterates(problem.objective, problem.w0, lr, 60) @ top
    assert np.sign(np.log(growth)) == np.sign(np.log(abs(along[-1] / along[-2]))) == np.sign(lr_sharpness - 2)


# ---- the quartic's period-2 orbit ----------------------------------------------------------------


@pytest.mark.parametrize("process_name", ["rod_flow", "edge_flow"])
@pytest.mark.parametrize("lr_sharpness", [2.2, 2.6])
def test_quartic_half_length_converges_to_the_period_two_orbit(process_name, lr_sharpness):
    """|r|^2 -> (S - 2/eta)/Q, GD's period-2 amplitude squared (to 1e-3 relative)."""
    sharpness, quartic = 30.0, 1.0
    lr = lr_sharpness / sharpness
    process, problem = build(process_name, {"name": "quartic", "sharpness": sharpness, "quartic": quartic}, lr)
    _, rows = advance(process, problem.w0, 400)
    closed_form = (sharpness - 2.0 / lr) / quartic
    gd = gd_iterates(problem.objective, problem.w0, lr, 400)
    np.testing.assert_allclose(gd[-1] ** 2, closed_form, rtol=1e-9)  # GD itself is on the orbit
    np.testing.assert_allclose(rows["amplitude"][-1] ** 2, gd[-1, 0] ** 2, rtol=1e-3)
    np.testing.assert_allclose(rows["half_length"][-1] ** 2, closed_form, rtol=1e-3)
    assert abs(rows["position"][-1, 0]) < 1e-6  # the centre sits at the origin
    np.testing.assert_allclose(rows["sharpness_along"][-1], 2.0 / lr, rtol=1e-6)  # pinned at 2/eta
    np.testing.assert_allclose(rows["predicted_loss"][-1], problem.objective.value(gd[-1]), rtol=1e-3)


@pytest.mark.parametrize("process_name, tolerance", [("rod_flow", 0.15), ("edge_flow", 0.03)])
def test_rod_ends_reproduce_gd_iterates_through_the_onset(process_name, tolerance):
    """x(k) + (-1)^k r(k) is GD's w_k: exactly at k = 1 (the first kick is GD's first step), then
    within ``tolerance`` x GD's orbit amplitude while the oscillation grows from 1e-2 to 1.6
    (measured 0.11 for the rod, whose growth rate eta S - 2 exceeds GD's log(eta S - 1), 0.023
    for the edge flow, whose rate is GD's)."""
    lr = 2.2 / 30.0
    process, problem = build(process_name, {"name": "quartic", "sharpness": 30.0, "dim": 2, "init": 0.01}, lr)
    _, rows = advance(process, problem.w0, 200)
    parity = (-1.0) ** np.arange(200)[:, None]
    ends = rows["position"] + parity * rows["amplitude"][:, None] * rows["top_vector"]
    gd = gd_iterates(problem.objective, problem.w0, lr, 199)
    error = np.linalg.norm(ends - gd, axis=1)
    assert error[1] < 1e-12
    assert error.max() < tolerance * np.linalg.norm(gd[-1])


# ---- GD's period-2 orbits are the models' fixed points, across the whole EoS range ---------------


class ScaledLoss(eqx.Module):
    """scale * L: GD and both models with step size lr on scale * L are exactly those with scale * lr on L,
    so one compilation at a fixed lr serves a vmapped sweep of effective step sizes."""

    objective: Objective
    scale: jax.Array

    def __call__(self, w):
        return self.scale * self.objective.value(w)


def sweep_step_size(process, problem, scales, steps):
    """GD's iterates and the model's predicted loss and amplitude at step sizes scales * lr, every step."""

    def run(scale):
        objective = Objective.from_function(ScaledLoss(problem.objective, scale))
        model = eqx.tree_at(lambda p: p.objective, process, objective)
        _, rows = jax.lax.scan(lambda s, _: model.step(s), model.init(problem.w0), None, length=steps)
        gd = gd_path(objective, problem.w0, process.lr, steps)
        return gd, rows["predicted_loss"] / scale, rows["amplitude"]

    return [np.asarray(a) for a in jax.jit(jax.vmap(run))(scales)]


SWEEPS = {  # (problem, lr of the compiled model, effective step sizes: the EoS range, steps)
    "matrix_factorization": (
        {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
        0.08,
        np.linspace(0.070, 0.0855, 10),
        1500,
    ),
    "quartic": (
        {"name": "quartic", "sharpness": 30.0, "dim": 2, "init": 0.1},
        0.08,
        np.linspace(2.05, 2.95, 10) / 30.0,
        600,
    ),
}


@pytest.mark.parametrize("process_name", ["rod_flow", "edge_flow"])
@pytest.mark.parametrize("problem_name", list(SWEEPS))
def test_period_two_orbits_are_fixed_points_across_the_eos_range(process_name, problem_name):
    """Wherever GD settles on a period-2 orbit (|w_{k+2} - w_k| < 1e-3 |w_{k+1} - w_k| over the last 50
    steps), the model sits at a fixed point: predicted loss and amplitude constant to 1e-6 over the last
    50 steps, amplitude = GD's half-oscillation |w_{k+1} - w_k|/2 to 1%. (Before the along-rod kick was
    limited to seeding, matrix factorization fell into period-4 cycles for lr in [0.083, 0.0853].)"""
    table, lr, step_sizes, steps = SWEEPS[problem_name]
    process, problem = build(process_name, table, lr)
    gd, predicted_loss, amplitude = sweep_step_size(process, problem, jnp.asarray(step_sizes / lr), steps)
    on_orbit = 0
    for i, step_size in enumerate(step_sizes):
        tail = gd[i, -52:]
        half = np.linalg.norm(tail[1:] - tail[:-1], axis=1) / 2
        if half.min() < 1e-3 or np.max(np.linalg.norm(tail[2:] - tail[:-2], axis=1)) > 1e-3 * half.min():
            continue  # GD is not (yet) on a period-2 orbit here
        on_orbit += 1
        assert np.ptp(predicted_loss[i, -50:]) < 1e-6, step_size
        assert np.ptp(amplitude[i, -50:]) < 1e-6, step_size
        np.testing.assert_allclose(amplitude[i, -1], half[-1], rtol=0.01, err_msg=f"lr = {step_size}")
    assert on_orbit >= 8  # the sweep covers the range where GD has a period-2 orbit


# ---- below the edge of stability ------------------------------------------------------------------


def smooth_problem():
    """A smooth non-quadratic loss: least squares plus a quartic, w in R^4 (sharpness ~ 4.5)."""
    rng = np.random.default_rng(3)
    a, b = jnp.asarray(rng.standard_normal((6, 4)) / 2), jnp.asarray(rng.standard_normal(6))
    objective = Objective.from_function(lambda w: 0.5 * jnp.sum((a @ w - b) ** 2) + 0.25 * jnp.sum(w**4))
    return objective, jnp.asarray(rng.standard_normal(4))


def rod_like(name, objective, lr, correction=True, curvature="hvp", substeps=4):
    from eosflow.flows.edge import EdgeFlow
    from eosflow.flows.rod import RodFlow, RodFlowOptions

    cls = {"rod_flow": RodFlow, "edge_flow": EdgeFlow}[name]
    return cls(
        name=name,
        lr=lr,
        spectrum=SpectrumSpec(every=0),
        key=jax.random.PRNGKey(0),
        objective=objective,
        options=RodFlowOptions(substeps=substeps, correction=correction, curvature=curvature),
    )


@pytest.mark.parametrize(
    "name, curvature",
    [(name, c) for name in ("rod_flow", "edge_flow") for c in ("hvp", "lookahead")] + [("rod_flow", "secant")],
)
def test_centre_follows_gd_to_second_order_below_eos(name, curvature):
    """At a fixed physical time eta * t = 2, the centre's distance to GD shrinks like eta^2 (the
    first backward-error correction, by HVPs, by gradients at the moved ends or by the last substep's
    velocity), gradient flow's and the uncorrected model's like eta. The lookahead's cost: four gradients
    per substep, no HVP; the secant's: two gradients per substep, as without the correction."""
    objective, w0 = smooth_problem()
    sharpness = float(np.linalg.eigvalsh(np.asarray(objective.hessian(w0)))[-1])
    errors = {}
    big, small = 0.2 / sharpness, 0.1 / sharpness
    for lr in (big, small):
        steps = int(round(2.0 / lr))
        gd = gd_iterates(objective, w0, lr, steps)[-1]
        counts = {}
        for correction in (True, False):
            _, rows = advance(rod_like(name, objective, lr, correction, curvature), w0, steps + 1)
            errors[lr, correction] = np.linalg.norm(rows["position"][-1] - gd)
            counts[correction] = rows["grads"], rows["hvps"]
        (grads, hvps), (plain_grads, plain_hvps) = counts[True], counts[False]
        np.testing.assert_array_equal(plain_grads, 2 * 4)  # two gradients per substep, 4 substeps
        extra = 2 * 4  # the correction: two HVPs or (lookahead) two gradients per substep, (secant) none
        np.testing.assert_array_equal(grads, plain_grads + (extra if curvature == "lookahead" else 0))
        np.testing.assert_array_equal(hvps, plain_hvps + (extra if curvature == "hvp" else 0))
    assert errors[big, True] / errors[small, True] > 3.5  # second order (measured 4.05)
    assert errors[big, False] / errors[small, False] < 2.5  # first order (measured 2.02)
    assert errors[big, True] < 0.05 * errors[big, False]  # (measured 0.019)


@pytest.mark.parametrize(
    "problem",
    [
        {"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5},
        {"name": "mlp", "n_train": 20, "n_test": 10, "width": 8},
        {"name": "sharp_valley"},
    ],
    ids=lambda p: p["name"],
)
def test_lookahead_correction_differs_from_the_hvp_one_at_third_order(problem):
    """eta mean g(x +- r + c eta E) = eta E + c eta^2 Hbar E + O(eta^3): at random centres and rods
    (|r| from 0 to 0.3 |x|), the two centre velocities differ by a multiple of eta^3, so halving eta
    divides the difference by 8, while the correction itself (the HVP velocity minus -eta E) only by 4."""
    from eosflow.flows.rod import rod_ends

    _, built = build("rod_flow", problem, 0.1)
    objective = built.objective
    w0 = jnp.asarray(built.w0)
    sharpness = float(np.linalg.eigvalsh(np.asarray(objective.hessian(w0)))[-1])
    rng = np.random.default_rng(0)
    for length_scale in (0.0, 0.03, 0.3):
        centre = w0 + 0.1 * jnp.linalg.norm(w0) * jnp.asarray(rng.standard_normal(w0.shape)) / w0.size**0.5
        direction = jnp.asarray(rng.standard_normal(w0.shape))
        direction = direction / jnp.linalg.norm(direction)
        length = jnp.asarray(length_scale * float(jnp.linalg.norm(centre)))
        gaps, corrections = [], []
        for lr in (0.2 / sharpness, 0.1 / sharpness, 0.05 / sharpness):
            hvp, lookahead = (
                rod_ends(objective, centre, direction, length, lr, 0.375, c) for c in ("hvp", "lookahead")
            )
            np.testing.assert_array_equal(hvp.mean_grad, lookahead.mean_grad)  # the ends themselves are shared
            gaps.append(float(jnp.linalg.norm(hvp.centre_velocity - lookahead.centre_velocity)))
            corrections.append(float(jnp.linalg.norm(hvp.centre_velocity + lr * hvp.mean_grad)))
        for big, small in zip(gaps, gaps[1:]):
            assert 7.0 < big / small < 9.0, (problem["name"], length_scale, gaps)  # eta^3
        for big, small in zip(corrections, corrections[1:]):
            assert 3.9 < big / small < 4.1  # eta^2
        assert gaps[-1] < 0.1 * corrections[-1]


@pytest.mark.parametrize("substeps", [2, 3, 4, 6])
def test_secant_centre_on_a_quadratic_is_the_two_step_recursion(substeps):
    """On L = w^T A w / 2 the mean gradient over the ends is A x whatever the rod, so the secant's centre is
    x_(i+1) = x_i + (h - c) v_i + c v_(i-1), v = -eta A x, c = (1 - h)/2, its first substep Euler's (no v
    before it), carried across the steps: checked against that recursion written in numpy over 30 steps,
    with eta lambda from 0.1 to 2.6 (the rod grows along eta lambda > 2; the centre does not see it)."""
    rng = np.random.default_rng(substeps)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    lr = 0.1
    eigenvalues = np.array([1.0, 5.0, 12.0, 21.0, 26.0])  # eta lambda 0.1 .. 2.6
    a = q @ np.diag(eigenvalues) @ q.T
    w0 = rng.standard_normal(5)
    objective = Objective.from_function(lambda w: 0.5 * w @ jnp.asarray(a) @ w)
    model = rod_like("rod_flow", objective, lr, curvature="secant", substeps=substeps)
    _, rows = advance(model, jnp.asarray(w0), 30)
    h, c = 1.0 / substeps, 0.5 * (1.0 - 1.0 / substeps)
    x, last, expected = w0.copy(), None, []
    for _ in range(30):
        expected.append(x.copy())
        for _ in range(substeps):
            v = -lr * a @ x
            x = x + (h - c) * v + c * (v if last is None else last)
            last = v
    # the ends' mean A (x + r) + A (x - r) cancels the rod, which grows along eta lambda = 2.6, to rounding of |A r|
    rounding = 1e-14 * eigenvalues[-1] * lr * np.max(rows["amplitude"])
    np.testing.assert_allclose(rows["position"], np.array(expected), rtol=1e-12, atol=rounding)
    assert np.max(rows["amplitude"]) > 1e3  # it did grow (so the centre's recursion was tested beside a rod)
    assert np.all(rows["grads"] == 2 * substeps) and np.all(rows["hvps"] == 0)


def test_secant_rod_flow_resumes_bitwise(tmp_path):
    """The secant's last velocity is part of the state: a run stopped mid-chunk and resumed equals the whole run."""
    import eosflow
    from eosflow.experiment import run

    small_mlp = {"name": "mlp", "width": 8, "n_train": 60, "n_test": 0}
    table = dict(steps=30, lr=0.5, processes=["gd", "rod_flow"], problem=small_mlp, record={"chunk": 10})
    table["rod_flow"] = {"curvature": "secant"}
    run(table, tmp_path / "whole")
    assert run(table, tmp_path / "cut", stop_after=15).status == "interrupted"
    run(table, tmp_path / "cut", resume=True)
    whole, resumed = eosflow.load(tmp_path / "whole"), eosflow.load(tmp_path / "cut")
    for name in ("loss", "predicted_loss", "amplitude", "distance"):
        np.testing.assert_array_equal(whole[name].values, resumed[name].values)
    assert np.isfinite(whole.predicted_loss.sel(process="rod_flow").values).all()


def test_rod_stays_of_the_order_of_the_half_step_below_eos():
    """Below EoS the rod's length never exceeds GD's half-step (eta/2)|g(w_t)| and its half-length
    sqrt(|r|^2 + (eta/2)^2 |E|^2) is that half-step to O(eta)."""
    objective, w0 = smooth_problem()
    lr = 0.3 / float(np.linalg.eigvalsh(np.asarray(objective.hessian(w0)))[-1])
    _, rows = advance(rod_like("rod_flow", objective, lr), w0, 40)
    gd = gd_iterates(objective, w0, lr, 39)
    half_step = 0.5 * lr * np.linalg.norm(np.asarray(jax.vmap(objective.grad)(gd)), axis=1)
    assert np.all(rows["amplitude"] <= half_step * (1 + 1e-9))
    assert rows["amplitude"][-1] < 1e-3 * half_step[-1]  # the non-oscillating rod dies out
    np.testing.assert_allclose(rows["half_length"][1:], half_step[1:], rtol=0.1)


# ---- the experiment's rows and the spec ------------------------------------------------------------


def test_rows_in_an_experiment_report_gd_oscillation(tmp_path):
    """In a run beside GD, the running RMS of GD's offset along the rod is the predicted amplitude."""
    import eosflow
    from eosflow.experiment import run

    table = {
        "steps": 200,
        "lr": 0.08,
        "dtype": "float64",
        "processes": ["gd", "rod_flow"],
        "problem": {"name": "quartic", "dim": 2, "init": 0.1},
        "spectrum": {"every": 0},
    }
    run(table, tmp_path / "run", overwrite=True)
    ds = eosflow.load(tmp_path / "run").sel(process="rod_flow")
    for key in (
        "loss",
        "predicted_loss",
        "amplitude",
        "half_length",
        "sharpness_along",
        "reference_offset",
        "grads",
        "hvps",
        "distance",
    ):
        assert np.all(np.isfinite(ds[key].values[:150])), key
    offset_rms = np.sqrt(np.mean(ds.reference_offset.values[-20:] ** 2))
    np.testing.assert_allclose(offset_rms, ds.amplitude.values[-1], rtol=1e-3)
    np.testing.assert_allclose(ds.amplitude.values[-1] ** 2, 30.0 - 2 / 0.08, rtol=1e-3)
    assert ds.grads.values[0] == 8 and ds.hvps.values[1] == 8  # 4 substeps x (2 gradients, 2 HVPs)


@pytest.mark.parametrize("process", ["rod_flow", "edge_flow"])
def test_bad_options_name_the_field(process):
    with pytest.raises(SpecError, match=f"{process}.substeps"):
        build(process, {"name": "quartic"}, 0.08, substeps=0)
    with pytest.raises(SpecError, match=f"{process}.correction"):
        build(process, {"name": "quartic"}, 0.08, correction="yes")
    with pytest.raises(SpecError, match=f"{process}.curvature"):
        build(process, {"name": "quartic"}, 0.08, curvature="secants")
    if process == "edge_flow":  # the secant needs the rod flow's last velocity in its state
        with pytest.raises(SpecError, match='edge_flow.curvature` = "secant" is rod_flow'):
            build(process, {"name": "quartic"}, 0.08, curvature="secant")
