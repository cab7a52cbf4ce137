"""Gradient, projected and central flows against independent oracles: the integrators'
stability polynomials and the matrix exponential on a quadratic, dense third-derivative tensors
for the central-flow velocity, the closed-form equilibrium of a sharp valley, and the GD
iterates themselves on a small MLP at the edge of stability."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import threadpoolctl
from scipy.ndimage import gaussian_filter1d

import eosflow
from eosflow.config import SpecError
from eosflow.experiment import prepare, run
from eosflow.flows.central import CentralFlow, CentralFlowOptions
from eosflow.flows.flow import Measured
from eosflow.flows.gradient import GradientFlowOptions
from eosflow.flows.integrate import substep_count
from eosflow.flows.sdcp import smat
from eosflow.objective import Objective
from eosflow.spec import SpectrumSpec, parse_spec
from eosflow.spectrum import hessian_eigenpairs


def test_substep_count_follows_the_sharpness():
    options = GradientFlowOptions(substeps=4, courant=0.5, max_substeps=64)
    counts = [int(substep_count(0.1, jnp.asarray(s), options)) for s in (5.0, 25.0, 1e4, jnp.nan)]
    assert counts == [4, 5, 64, 4]  # max(4, ceil(2 eta S)), capped, and the minimum when S is unknown


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_gradient_flow_on_a_quadratic(method):
    """Per eigenmode, n substeps multiply by R(-eta lambda / n)^n: R(z) = 1 + z (Euler) or the
    degree-4 Taylor polynomial of e^z (RK4); the exact flow is exp(-eta H t)."""
    lr, steps = 0.15, 12  # eta S = 3: the substep rule gives n = 6
    _, problem, _, processes = prepare(
        {
            "steps": steps,
            "lr": lr,
            "dtype": "float64",
            "processes": ["gradient_flow"],
            "problem": {"name": "quadratic", "eigenvalues": [20.0, 10.0, 1.0]},
            "spectrum": {"k": 1, "k_max": 1},
            "gradient_flow": {"method": method},
        }
    )
    flow = processes["gradient_flow"]
    _, rows = flow.advance(flow.init(problem.w0), steps)
    hessian = np.asarray(problem.objective.hessian(problem.w0))
    values, basis = np.linalg.eigh(hessian)
    n = 6
    z = -lr * values / n
    growth = 1 + z if method == "euler" else 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
    w0 = np.asarray(problem.w0)
    for t in (1, 5, steps - 1):
        predicted = basis @ (growth ** (n * t) * (basis.T @ w0))
        np.testing.assert_allclose(rows["position"][t], predicted, atol=1e-13)
    assert np.all(rows["substeps"] == n)
    exact = scipy.linalg.expm(-lr * (steps - 1) * hessian) @ w0
    error = np.linalg.norm(rows["position"][-1] - exact) / np.linalg.norm(w0)
    assert error < (1e-3 if method == "rk4" else 0.1)


def tiny_mlp(params, x):
    w1, b1, w2 = params
    return jnp.tanh(x @ w1 + b1) @ w2


def test_central_velocity_against_dense_third_derivatives():
    """X solves the SDCP and dw/dt = -eta (g + 1/2 sum_ij X_ij G_ij) with G_ij = T[u_i, u_j, .]
    from the dense third-derivative tensor T (off-diagonal pairs included, each ordered pair once)."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 5)) / 2, rng.standard_normal(5) / 2, rng.standard_normal((5, 2)) / 2]
    inputs, targets = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    objective, w = Objective.from_model(
        tiny_mlp, [jnp.asarray(p) for p in params], jnp.asarray(inputs), jnp.asarray(targets), loss="mse"
    )
    lr, dt, m = 0.1, 0.25, 3
    flow = CentralFlow(
        name="central_flow",
        lr=lr,
        spectrum=SpectrumSpec(),
        key=jax.random.PRNGKey(0),
        objective=objective,
        options=CentralFlowOptions(),
    )
    U = np.linalg.qr(rng.standard_normal((w.size, m)))[0]
    grad = np.asarray(objective.grad(w))
    T = np.asarray(jax.jit(jax.jacfwd(objective.hessian))(w))
    G = np.einsum("abc,ai,bj->ijc", T, U, U)
    drift = dt * lr * np.einsum("ijc,c->ij", G, grad)
    rotation = np.linalg.qr(rng.standard_normal((m, m)))[0]
    slack = -(1 + np.abs(drift).max()) * rotation @ np.diag([1.0, 0.6, -0.4]) @ rotation.T  # two overshoot
    scaled = eqx.filter_jit(CentralFlow.pair_gradients)(flow, w, jnp.asarray(U))
    velocity, X = eqx.filter_jit(CentralFlow.sdcp_velocity)(flow, jnp.asarray(grad), jnp.asarray(slack), scaled, dt)
    X = np.asarray(X)
    Z = slack + drift + 0.5 * dt * lr * np.einsum("ijc,klc,kl->ij", G, G, X)
    scale = np.abs(X).max()
    assert np.linalg.eigvalsh(X).min() > -1e-10 * scale and np.linalg.eigvalsh(Z).min() > -1e-8
    assert abs(np.sum(X * Z)) < 1e-8 * scale
    assert np.abs(X[0, 1]) > 1e-3 * scale  # the off-diagonal coupling is exercised
    np.testing.assert_allclose(velocity, -lr * grad - 0.5 * lr * np.einsum("ijc,ij->c", G, X), atol=1e-10)


def tiny_mlp_flow(seed: int, noise: float, tol: float, max_iters: int, remeasure: bool):
    """A float64 tiny MLP at lr = 2 / lambda_1 (its top two eigenvalues critical), its central flow and the
    step's critical set from LOBPCG started ``noise`` away from the dense top three eigenvectors:
    (objective, w, jitted Hessian, its eigenvalues, the flow, the critical set, the rng)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal((3, 5)) / 2, rng.standard_normal(5) / 2, rng.standard_normal((5, 2)) / 2]
    inputs, targets = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    objective, w = Objective.from_model(
        tiny_mlp, [jnp.asarray(p) for p in params], jnp.asarray(inputs), jnp.asarray(targets), loss="mse"
    )
    hessian = jax.jit(lambda point: objective.hessian(point))
    values, vectors = np.linalg.eigh(np.asarray(hessian(w)))
    flow = CentralFlow(
        name="central_flow",
        lr=float(2.0 / values[-1]),
        spectrum=SpectrumSpec(k=3, k_max=3),
        key=jax.random.PRNGKey(0),
        objective=objective,
        options=CentralFlowOptions(
            margin=float(1.0 - 0.5 * (values[-2] + values[-3]) / values[-1]), remeasure=remeasure
        ),
    )
    state = flow.init(w)
    start = jnp.asarray(vectors[:, ::-1][:, :3] + noise * rng.standard_normal((w.size, 3)))
    pairs = hessian_eigenpairs(objective, w, start, tol=tol, max_iters=max_iters)
    _, critical = flow.prepare(w, Measured(pairs.vectors, pairs.values, pairs.values[0], state.vectors), state.step)
    return objective, w, hessian, values, flow, critical, rng


def test_slack_from_ritz_values_moved_by_pair_gradients_is_second_order():
    """At the centre, A = 2/eta - diag(theta) from the eigensolver equals U^T (2/eta - H) U by dense
    float64 Hessians; moved along the step by the pair gradients it is off by O(|dw|^2) (halving
    dw quarters the error), so a substep spends no HVP."""
    _, w, hessian, values, flow, critical, rng = tiny_mlp_flow(1, 1e-3, 1e-10, 200, remeasure=False)
    lr = flow.lr
    assert int(critical.count) == 2
    U = np.asarray(critical.vectors)

    def dense_slack(point):
        return 2.0 / lr * np.eye(3) - U.T @ np.asarray(hessian(point)) @ U  # U's third column is zero

    np.testing.assert_allclose(critical.slack, dense_slack(w), atol=1e-8 * values[-1])
    direction = rng.standard_normal(w.size)
    errors = []
    for size in (1e-2, 5e-3):
        moved = w + size * direction / np.linalg.norm(direction)
        linear = np.asarray(critical.slack) - np.asarray(smat(critical.scaled @ (moved - w)))
        errors.append(np.abs(linear - dense_slack(moved)).max())
    assert 3.0 < errors[0] / errors[1] < 5.0  # second order in |dw|
    _, aux = flow.field(w, critical, 0.25)
    assert int(flow.observe(w, aux, critical, 4)["hvps"]) == 0  # beyond the eigensolver's


@pytest.mark.parametrize("tol, max_iters", [(1e-2, 2), (1e-3, 1)])
def test_the_first_substep_takes_the_slack_from_the_ritz_values_at_any_tolerance(tol, max_iters):
    """With ``remeasure`` the first substep is at the centre, where U^T H U = diag(theta) holds for the
    eigensolver's Ritz vectors whether or not they converged (Rayleigh-Ritz): it takes the slack from them
    (no HVP) and moves exactly as with the slack re-measured there by dense float64 Hessians; a later
    substep (away from the centre) re-measures it by m HVPs. The step counts (n - 1) m HVPs and n - 1
    gradients: the first substep's (L, g) come with the measurement's linearization."""
    objective, w, hessian, _, flow, critical, _ = tiny_mlp_flow(7, 0.1, tol, max_iters, remeasure=True)
    lr = flow.lr
    m = int(critical.count)
    assert m >= 1
    U = np.asarray(critical.vectors)

    def dense_velocity(point):
        slack = 2.0 / lr * np.eye(3) - U.T @ np.asarray(hessian(point)) @ U
        grad = objective.grad(jnp.asarray(point))
        return np.asarray(flow.sdcp_velocity(grad, jnp.asarray(slack), critical.scaled, 0.25)[0])

    scale = lr * float(jnp.linalg.norm(objective.grad(w)))
    at_centre, _ = flow.field(w, critical, 0.25)
    np.testing.assert_allclose(at_centre, dense_velocity(w), atol=1e-10 * scale)
    moved = w + 1e-2 * at_centre / jnp.linalg.norm(at_centre)
    np.testing.assert_allclose(flow.field(moved, critical, 0.25)[0], dense_velocity(moved), atol=1e-10 * scale)
    _, aux = flow.field(w, critical, 0.25)
    row = flow.observe(w, aux, critical, 4)
    assert int(row["hvps"]) == 3 * m and int(row["grads"]) == 3  # the centre's came with the measurement
    # the measurement's (L, g) at the centre, the first substep's, are the objective's own
    _, _, sharpness, (loss, grad) = flow.measure(w, critical.vectors[:, :1], jnp.asarray(0))
    np.testing.assert_allclose(grad, objective.grad(w), rtol=1e-13, atol=1e-15)
    assert float(loss) == pytest.approx(float(objective.value(w)), rel=1e-14)
    assert float(sharpness) == pytest.approx(2.0 / lr, rel=1e-2)


def test_projected_and_central_flows_reach_the_valley_equilibrium():
    """f = 1/2 S e^x y^2 - eps x (straight valley): the centre stops where S e^x = 2/eta, and
    dx/dt = 0 there needs sigma^2 = 2 eps / s'(x) = eps eta (closed form). Two eigenpairs are
    tracked; the second (~0) must stay out of the critical set."""
    lr, eps, steps = 0.2, 0.02, 300
    table = {
        "steps": steps,
        "lr": lr,
        "dtype": "float64",
        "processes": ["projected_flow", "central_flow"],
        "problem": {"name": "sharp_valley", "sharpness": 5.0, "rate": 1.0, "bend": 0.0, "eps": eps, "y0": 0.1},
        "spectrum": {"k": 2, "k_max": 2},
    }
    _, problem, _, processes = prepare(table)
    x_star = np.log(2 / (lr * 5.0))
    for flow in processes.values():
        rows = {key: np.asarray(value) for key, value in flow.advance(flow.init(problem.w0), steps)[1].items()}
        assert rows["position"][-1][0] == pytest.approx(x_star, abs=1e-3)
        assert rows["covariance"][-1][0] == pytest.approx(eps * lr, rel=1e-2)
        assert rows["covariance"][-1][1] == 0 and rows["critical"][-1] == 1
        assert rows["sharpness"][-1] == pytest.approx(2 / lr, rel=1e-3)
        assert rows["predicted_loss"][-1] == pytest.approx(rows["loss"][-1] + eps, rel=1e-2)  # + sigma^2 / eta


@pytest.mark.slow
def test_central_flow_tracks_gd_at_the_edge_of_stability(tmp_path):
    """The reference MLP (swish 8-16-16-4, 484 parameters) at eta = 0.1 in float32: three
    eigenvalues reach 2/eta. Oracles: GD's own iterates and losses, and dense float64 Hessians."""
    lr, steps = 0.1, 600
    table = {
        "steps": steps,
        "lr": lr,
        "dtype": "float32",
        "processes": ["gd", "gradient_flow", "central_flow"],
        "problem": {"name": "mlp_regression"},
        "spectrum": {"k": 3, "k_max": 3},
        "record": {"chunk": 300, "params_every": 50},
    }
    run(table, tmp_path / "run")
    ds = eosflow.load(tmp_path / "run")
    gd, gf, cf = (ds.sel(process=p) for p in ("gd", "gradient_flow", "central_flow"))
    edge = 2 / lr
    active = cf.amplitude.values > 0
    eos = int(np.argmax(active))
    assert 150 < eos < 400 and active[eos:].all()
    # several eigenvalues reach 2/eta, for GD and (as critical directions) for the central flow
    assert np.nanmax(gd.eigenvalues.values[:, 1]) > edge and np.nanmax(cf.critical.values) >= 2
    assert np.max(cf.covariance.values[:, 1]) > 0
    # distance to GD at the end: a small fraction of gradient flow's
    ratio = float(cf.distance[-1] / gf.distance[-1])
    assert ratio <= 0.25, ratio
    # predicted time-averaged loss against GD's Gaussian-smoothed loss over the EoS phase
    width = 20
    smooth = gaussian_filter1d(gd.loss.values.astype(np.float64), width, mode="nearest")
    phase = slice(eos + 3 * width, steps - 3 * width)
    relative = np.abs(cf.predicted_loss.values[phase] - smooth[phase]) / smooth[phase]
    assert relative.max() < 0.10, relative.max()
    # sharpness pinned at 2/eta while Sigma != 0: tracked eigenvalues, and dense float64 Hessians
    assert np.max(np.abs(cf.sharpness.values[active] / edge - 1)) < 0.01
    saved_steps, saved = eosflow.load_params(tmp_path / "run", "central_flow")
    _, problem, _, _ = prepare({**table, "dtype": "float64"})
    hessian = jax.jit(jax.hessian(problem.objective.value))
    for step, w in zip(saved_steps, saved):
        if active[step]:
            # one LAPACK thread: on a busy 2-core machine OpenBLAS's threads make this eigh ~100x slower
            with threadpoolctl.threadpool_limits(1):
                sharpness = np.linalg.eigvalsh(np.asarray(hessian(jnp.asarray(w, jnp.float64))))[-1]
            assert abs(sharpness / edge - 1) < 0.01, (step, sharpness)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"substeps": 100}, "central_flow.substeps"),
        ({"margin": 1.5}, "central_flow.margin"),
        ({"max_critical": 0}, "central_flow.max_critical"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec({"processes": ["gd", "central_flow"], "central_flow": options})


def test_a_centre_outside_the_stable_set_is_dropped_with_the_reason(tmp_path):
    """The quartic L = 15 w^2 - w^4/4 from w0 = 0.1 at lr = 0.08: S(w0) = 30 - 3 w0^2, so
    lr S(w0) = 2.3976 > 2 where grad S ~ 0; both flows blow up at once and say why, GD runs on."""
    spec = {
        "steps": 20,
        "lr": 0.08,
        "dtype": "float64",
        "processes": ["gd", "central_flow", "projected_flow"],
        "problem": {"name": "quartic", "dim": 1, "sharpness": 30.0, "quartic": 1.0, "init": 0.1},
        "spectrum": {"k": 1, "k_max": 1},
    }
    outcome = run(spec, tmp_path / "run", overwrite=True)
    assert outcome.status == "completed"
    dropped = json.loads((tmp_path / "run" / "summary.json").read_text())["dropped_processes"]
    expected = f"{0.08 * (30.0 - 3 * 0.1**2):.4g}"
    for name, words in (("central_flow", "central flow"), ("projected_flow", "projected flow")):
        assert f"lr*S = {expected} > 2, outside the set {{S <= 2/lr}} on which the {words} is defined" in dropped[name]


MLP = {"name": "mlp", "dataset": "digits", "n_train": 100, "n_test": 0, "width": 16, "depth": 2}


@pytest.mark.parametrize(
    "optimizer, flow, settings, steps",
    [
        ("gd", "central_flow", {"lr": 0.7}, 100),  # at the edge from w0: the overshoot is on every step (old: x1.79)
        (
            "rmsprop",
            "rmsprop_central_flow",
            {"lr": 0.004, "rmsprop": {"beta2": 0.99, "eps": 0.003, "bias_correction": True}},
            150,
        ),  # reaches its edge later (old: x1.38)
    ],
)
def test_central_flows_prediction_does_not_depend_on_the_substeps(optimizer, flow, settings, steps):
    """Each step re-measures U, and the SDCP at its first substep pulls the overshoot of the critical
    eigenvalues above 2/lr (built up since the last measurement) back within that substep, X ~ -A/dt.
    Reporting that X made the predicted loss grow with the substep count (old ratios from courant 0.5
    to 0.25 in the parameters); the row reports X averaged over the step's substeps: the
    same prediction at both (after the first critical step), within the optimizer's own loss floor of
    its smoothed loss."""
    from eosflow.compare import gaussian_smooth, relative_l1_error

    excess, errors = {}, {}
    for courant in (0.5, 0.25):
        table = {
            "dtype": "float64",
            "processes": [optimizer, flow],
            "problem": MLP,
            "spectrum": {"every": 1, "k": 1, "k_max": 3},
            flow: {"courant": courant},
            **settings,
        }
        _, problem, _, processes = prepare(table)
        rows = {name: p.advance(p.init(problem.w0), steps)[1] for name, p in processes.items()}
        model, loss = rows[flow], np.asarray(rows[optimizer]["loss"])
        edge = slice(int(np.flatnonzero(np.asarray(model["critical"]) > 0)[0]), None)
        predicted = np.asarray(model["predicted_loss"])[edge]
        excess[courant] = np.mean(predicted - np.asarray(model["loss"])[edge])
        errors[courant] = relative_l1_error(predicted, gaussian_smooth(loss)[edge])
        floor = relative_l1_error(loss[edge], gaussian_smooth(loss)[edge])
    assert excess[0.5] > 0 and abs(excess[0.25] / excess[0.5] - 1) < 0.05
    assert max(errors.values()) < floor


def test_critical_count_says_whether_the_critical_set_is_shown_complete():
    """m counts the tracked eigenvalues at or above the threshold (at most m_max); the set is shown
    complete only by a tracked eigenvalue below the threshold right after the m-th."""
    from eosflow.flows.flow import critical_count

    def count(values, m_max, dimension=10):
        m, complete = critical_count(jnp.asarray(values), 4.85, m_max, dimension)
        return int(m), int(complete)

    assert count([5.0, 4.9, 3.0], 3) == (2, 1)  # 3.0 < 4.85 closes the set
    assert count([5.0, 4.9, 3.0], 1) == (1, 0)  # m_max cut it: 4.9 is critical and left out
    assert count([5.0, 4.9], 2) == (2, 0)  # every tracked one critical: the third is unknown
    assert count([4.0, 3.0], 2) == (0, 1)  # before the edge
    assert count([np.nan, np.nan], 2) == (0, 0)  # not measured: nothing is shown
    assert count([5.0, 4.9], 2, dimension=2) == (2, 1)  # every eigenvalue there is is tracked
    assert count([5.0, 4.9], 1, dimension=2) == (1, 0)  # ... but m_max cut the set


def test_an_incomplete_critical_set_is_reported_against_dense_eigenvalues(tmp_path):
    """A valley with three nearly equal sharp directions, L = sum_i S_i e^x y_i^2 / 2 - eps x with
    S = (5, 4.95, 4.9, 1): at the edge the top three eigenvalues are all within the critical margin.
    Oracle: the dense float64 Hessian at every saved centre. With k_max = 4 the flow's set is shown
    complete and equals the dense count at every step; with k_max = 2 every step at which the dense
    count exceeds 2 is flagged, and so is every step of the projected flow (one direction) with more
    than one critical eigenvalue; the warning names the setting to raise."""
    sharp = jnp.asarray([5.0, 4.95, 4.9, 1.0])
    lr, eps, margin = 0.2, 0.1, 0.03

    def loss(w):
        return 0.5 * jnp.sum(sharp * jnp.exp(w[0]) * w[1:] ** 2) - eps * w[0]

    problem = eosflow.Problem.from_function(loss, jnp.asarray([0.0, 0.1, -0.1, 0.1, 0.1], jnp.float64))
    hessian = jax.jit(jax.hessian(loss))

    def dense_counts(run_dir, process):
        steps, params = eosflow.load_params(run_dir, process)
        values = [np.linalg.eigvalsh(np.asarray(hessian(jnp.asarray(w)))) for w in params]
        return np.asarray(steps), np.array([np.sum(v >= (1 - margin) * 2 / lr) for v in values])

    settings = {"lr": lr, "steps": 80, "record": {"params_every": 1}}
    with pytest.warns(eosflow.compare.CriticalSetWarning) as caught:
        cut = eosflow.simulate(
            problem,
            processes=["gd", "central_flow", "projected_flow"],
            spectrum={"k": 2, "k_max": 2},
            out=tmp_path / "cut",
            **settings,
        )
    notes = {str(w.message).split(":")[0]: str(w.message) for w in caught}
    assert set(notes) == {"central_flow", "projected_flow"} and "raise `spectrum.k_max`" in notes["central_flow"]
    full = eosflow.simulate(
        problem,
        processes=["gd", "central_flow"],
        spectrum={"k": 4, "k_max": 4},
        out=tmp_path / "full",
        **settings,
    )

    steps, dense = dense_counts(tmp_path / "full", "central_flow")
    flow = full.sel(process="central_flow")
    assert dense.max() == 3 and (dense == 3).sum() > 10  # the edge is reached and holds three
    np.testing.assert_array_equal(flow.critical.values[steps], dense)
    assert (flow.critical_complete.values == 1).all()
    assert eosflow.compare.compare_dataset(full).loc["central_flow", "critical_incomplete"] == 0

    for process, held in (("central_flow", 2), ("projected_flow", 1)):
        steps, dense = dense_counts(tmp_path / "cut", process)
        flow = cut.sel(process=process)
        flagged = flow.critical_complete.values[steps] == 0
        np.testing.assert_array_equal(flagged, dense > held)
        assert (flow.critical.values[steps] == np.minimum(dense, held)).all()
    table = eosflow.compare.compare_dataset(cut)
    assert 0 < table.loc["central_flow", "critical_incomplete"] < 1 and np.isnan(table.loc["gd", "critical_incomplete"])
    page = eosflow.compare.write_report(tmp_path / "cut").read_text()
    assert "central_flow: at " in page and "projected_flow: at " in page and "by definition" in page
