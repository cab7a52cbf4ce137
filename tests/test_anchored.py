"""Models started on their optimizer's state at step k (eosflow.anchored): the window's arithmetic against
closed forms, the start's order against the optimizer's own iterates, the rod's phase on a period-2
orbit, the reference rows against a run from w0, the leaderboard's columns, and the refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eosflow.anchored as anchored_module
from eosflow.anchored import anchored, onset_step
from eosflow.compare import compare_dataset
from eosflow.config import SpecError
from eosflow.experiment import prepare, run
from eosflow.flows.moments import Phase
from eosflow.leaderboard import FROM_ONSET, from_onset, markdown
from eosflow.load import load
from eosflow.optim.adaptive import OptimizerState, RuleState
from test_adaptive_flows import STABLE_CASES, model_table

QUARTIC = {"name": "quartic", "sharpness": 30.0, "quartic": 1.0, "dim": 1}


def build(name: str, hyper: dict, model: str, moments: str = "lag", lr: float = 0.01):
    _, problem, _, processes = prepare(model_table(name, hyper, lr, model, moments=moments))
    return problem, processes[name], processes[f"{name}_{model}"]


WINDOW_CASES = {  # optimizer, hyperparameters, the model's moments
    "adam": ("adam", {"beta1": 0.7, "beta2": 0.9}, "lag"),
    "momentum classical": ("momentum", {"beta": 0.6}, "lag"),
    "nesterov": ("nesterov", {"beta": 0.4}, "lag"),
    "rmsprop reference": ("rmsprop", {"beta2": 0.8}, "reference"),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
@pytest.mark.parametrize("k", [6, 7])
def test_the_start_takes_the_window_centres_and_the_rod_in_phase(case, k):
    """States w_j = a + b j + (-1)^j r (and m, nu alike) at j = k-2 .. k+2: the start is the linear trend
    without the oscillation, w = a + b k, D = the trend of the discrete D at k + 1/2, nu at k + 1/2 (k + 1
    with the reference moments), q = 1 - b^k (1 + b)/2, and the rod is (r_w, r_m) whatever the parity of k."""
    name, hyper, moments = WINDOW_CASES[case]
    problem, _, flow = build(name, hyper, "rod_flow", moments)
    d = problem.w0.size
    a, b, r, am, bm, rm, n0, n1 = (jax.random.normal(jax.random.PRNGKey(i), (d,), jnp.float64) for i in range(8))
    n0, n1 = jnp.abs(n0), jnp.abs(n1)
    vectors = jnp.ones((d, 1))
    window = [
        OptimizerState(
            a + b * j + (-1) ** j * r,
            a,
            a,
            RuleState(am + bm * j + (-1) ** j * rm, n0 + n1 * j, jnp.asarray(j)),
            vectors,
            vectors[None],
            j,
        )
        for j in range(k - 2, k + 3)
    ]
    state = flow.start_on(window)
    centre, rod = state.z
    beta = hyper.get("beta", 0.0)
    trend = am + bm * (k + 0.5) + (beta * bm if name == "nesterov" else 0.0)  # D_j = (1 + b) m_j - b m_(j-1)
    rule = flow.moments.rule
    q = [1 - rule.beta1**k * (1 + rule.beta1) / 2 if flow.moments.corrects[0] else 1.0]
    q += [1 - rule.beta2**k * (1 + rule.beta2) / 2 if flow.moments.corrects[1] else 1.0]
    expected = Phase(a + b * k, trend, n0 + n1 * (k + (1.0 if moments == "reference" else 0.5)), jnp.asarray(q))
    for got, want in zip(centre, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rod.w, r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rod.m, rm, rtol=1e-12, atol=1e-12)
    assert int(state.step) == k and state.vectors is vectors
    with pytest.raises(ValueError, match="5 consecutive states"):
        flow.start_on(window[:2] + window[3:] + window[:1])


@pytest.mark.parametrize("case", ["adam", "nesterov", "momentum ema"])
def test_a_model_started_on_the_optimizer_follows_it_to_second_order(case):
    """The stable flow started on the optimizer's state at lr k = 0.15, against the optimizer at
    lr t = 0.3: halving lr divides the distance by ~4 (measured 3.9-6.9 over the stable cases)."""
    name, hyper, lr = STABLE_CASES[case]

    def distance(lr: float) -> float:
        problem, optimizer, flow = build(name, hyper, "stable_flow", lr=lr)
        k, end = round(0.15 / lr), round(0.3 / lr)
        state = optimizer.init(jnp.asarray(problem.w0))
        state, _ = optimizer.advance(state, k - 2)
        window = [state]
        for _ in range(4):
            window.append(optimizer.advance(window[-1], 1)[0])
        moved = np.asarray(flow.advance(flow.start_on(window), end - k + 1)[1]["position"][-1])
        target = np.asarray(optimizer.advance(window[2], end - k + 1)[1]["position"][-1])
        return float(np.linalg.norm(moved - target) / np.linalg.norm(target - window[2].w))

    assert distance(lr) / distance(lr / 2) > 3.5


def quartic_table(at_steps: int = 200) -> dict:
    """Heavy ball (beta 0.5) at lr S = 3.3 on the 1-D quartic, past its threshold 2 (1 + beta) = 3: a
    period-2 orbit from the first steps."""
    return {
        "name": "quartic-momentum",
        "lr": 0.11,
        "steps": at_steps,
        "dtype": "float64",
        "processes": ["momentum", "momentum_stable_flow", "momentum_rod_flow"],
        "problem": QUARTIC,
        "spectrum": {"k_max": 1},
        "momentum": {"beta": 0.5},
        "record": {"chunk": 50},
    }


@pytest.mark.parametrize("at", ["onset", 7, 40])
def test_the_rod_started_on_an_orbit_stays_in_phase_with_it(at, tmp_path):
    """On heavy ball's period-2 orbit the rod flow started at step k predicts the optimizer's side:
    (-1)^t <w_opt - centre, u> / amplitude is 1 at k (exactly) and within 15% of 1 at every later step
    (-1 with the rod's sign or parity wrong). The optimizer's rows are those of the run from w0."""
    table = quartic_table()
    ds = anchored(table, at)
    k = ds.attrs["anchored_at"]
    assert k == (max(onset_step(ds["edge_ratio"].sel(process="momentum").values), 2) if at == "onset" else at)
    steps = ds["step"].values
    assert steps[0] == k and steps[-1] == table["steps"] - 1
    rod = ds.sel(process="momentum_rod_flow")
    side = (-1.0) ** steps * rod["reference_offset"].values / rod["amplitude"].values
    assert abs(side[0] - 1) < 1e-12
    assert np.all(np.abs(side - 1) < 0.15), side.min()
    run(table, tmp_path / "run")
    from_w0 = load(tmp_path / "run").sel(process="momentum", step=steps)
    for column in ("loss", "edge_ratio", "oscillation"):
        np.testing.assert_array_equal(ds[column].sel(process="momentum").values, from_w0[column].values)
    table_row = compare_dataset(ds).loc["momentum_rod_flow"]
    assert table_row["loss_error_averaged"] < 0.01  # the orbit's mean loss (the stable flow's is off by 100%)
    assert compare_dataset(ds).loc["momentum_stable_flow", "loss_error_averaged"] > 0.5


def test_gds_rod_and_edge_flows_started_on_its_orbit_stay_in_phase_with_it():
    """GD at lr S = 2.4 on the quartic (a period-2 orbit): the rod and edge flows started at step 9 (odd)
    and 40 predict GD's side at every later step; the flows without an oscillation start at the centre."""
    table = {
        **quartic_table(),
        "lr": 0.08,
        "processes": ["gd", "gradient_flow", "rod_flow", "edge_flow", "free_energy", "central_flow"],
    }
    del table["momentum"]
    for at in (9, 40):
        ds = anchored(table, at)
        # the central flow is undefined at the orbit's centre (lr S = 2.4 > 2): dropped with the reason a run
        # from w0 gives, hint included (the restarted run gave the bare blow-up before)
        assert "outside the set {S <= 2/lr}" in json.loads(ds.attrs["dropped_processes"])["central_flow"]
        steps = ds["step"].values
        for model in ("rod_flow", "edge_flow"):
            row = ds.sel(process=model)
            side = (-1.0) ** steps * row["reference_offset"].values / row["amplitude"].values
            assert abs(side[0] - 1) < 1e-12 and np.all(np.abs(side - 1) < 0.15), (model, at, side.min())
        first = ds["distance"].isel(step=0)  # every model starts at GD's centre c_k, |w_k - c_k| from GD
        np.testing.assert_allclose(
            first.sel(process=["gradient_flow", "edge_flow", "free_energy"]), first.sel(process="rod_flow")
        )
        assert float(first.sel(process="rod_flow")) > 0.01
        # the free-energy model starts with GD's amplitude (from zero it would regrow it: error 0.32)
        assert compare_dataset(ds).loc["free_energy", "loss_error_averaged"] < 0.01


def test_the_particle_model_starts_on_gds_centre_and_rod():
    """On the mean-field network the particle model started at step k holds GD's centre and rod, as the
    rod flow does: the same distance to GD and amplitude |r_k| at k (from w0 its delta is lr/2 g)."""
    width = 16
    problem = {"name": "two_layer_meanfield", "width": width, "n_train": 64, "dataset": "gaussian", "input_dim": 4}
    table = {
        "steps": 40,
        "lr": width * 4.0,
        "dtype": "float64",
        "problem": problem,
        "processes": ["gd", "rod_flow", "particle_model"],
        "spectrum": {"k": 1, "k_max": 1},
    }
    first = anchored(table, 21).isel(step=0)
    assert float(first["amplitude"].sel(process="rod_flow")) > 1e-3
    for column in ("distance", "amplitude"):
        np.testing.assert_allclose(first[column].sel(process="particle_model"), first[column].sel(process="rod_flow"))


def test_the_leaderboard_scores_the_models_from_the_onset():
    """``from_onset`` adds the onset step and the metrics from it to an adaptive entry's rows, and the
    page shows them only when the rows have them."""
    table = quartic_table(120)
    columns = from_onset(table)
    assert list(columns["process"]) == table["processes"]
    assert set(columns["onset"]) == {anchored(table).attrs["anchored_at"]}
    assert columns.set_index("process").loc["momentum_stable_flow", "relative_distance_from_onset"] == 1.0
    # the optimizer's own row: its copy restarted a rounding away, the floor of each column
    floor = compare_dataset(anchored(table)).loc["momentum_nudged"]
    own = columns.set_index("process").loc["momentum"]
    for column, _ in FROM_ONSET[1:]:
        assert own[column] == floor[column.removesuffix("_from_onset")], column
    assert np.isfinite(own["loss_error_averaged_from_onset"])
    rows = columns.assign(problem="quartic-momentum", status="ok")
    assert "rel. distance from onset" in markdown(rows)[0]
    assert "rel. distance from onset" not in markdown(rows.drop(columns=[c for c, _ in FROM_ONSET]))[0]
    with pytest.warns(UserWarning, match="never reached its edge"):
        quiet = from_onset({**table, "lr": 0.05})
    assert list(quiet.columns) == ["process"]


def test_what_cannot_be_anchored_is_refused_by_name():
    table = quartic_table(60)
    plain = {k: v for k, v in table.items() if k != "momentum"}
    with pytest.raises(SpecError, match="'sgd', is not GD or a momentum or adaptive optimizer"):
        anchored({**plain, "processes": ["sgd", "langevin"]}, 10)
    with pytest.raises(SpecError, match="'langevin' is not a model of 'gd'"):
        anchored({**plain, "processes": ["gd", "langevin"]}, 10)
    with pytest.raises(SpecError, match="'rmsprop_stable_flow' is not a model of 'momentum'"):
        anchored({**table, "processes": ["momentum", "rmsprop_stable_flow"]}, 10)
    with pytest.raises(SpecError, match=r"k must lie in \[2, 57\]"):
        anchored(table, 58)
    with pytest.raises(SpecError, match=r"a run needs at least 5 steps \(`steps` = 4\)"):  # before: "in [2, 1]"
        anchored({**table, "steps": 4}, 2)
    with pytest.raises(SpecError, match="give a step"):
        anchored(table, "start")
    with pytest.raises(SpecError, match="never reached its edge of stability .* largest was"):
        anchored({**table, "lr": 0.05}, "onset")
    with pytest.raises(SpecError, match="diverged"):
        anchored({**table, "lr": 0.3}, "onset")


def test_the_nudged_copy_is_the_optimizer_restarted_a_rounding_away(monkeypatch):
    """``nudged`` moves w (and ``previous``) by about eps ||w|| and nothing else; restarted unmoved, the copy is
    the optimizer's own run from k bit for bit (so its rows are aligned with the reference's), and on a
    contracting period-2 orbit the moved copy stays within rounding of it."""
    table = quartic_table(120)
    _, _, _, processes = prepare(table)
    optimizer = processes["momentum"]
    state, _ = optimizer.advance(optimizer.init(jnp.asarray([0.3])), 7)
    moved = anchored_module.nudged(state)
    eps = np.finfo(np.float64).eps
    step = np.asarray(moved.w - state.w)
    assert 0 < np.linalg.norm(step) <= 3 * eps * float(jnp.linalg.norm(state.w))
    np.testing.assert_array_equal(np.asarray(moved.previous - state.previous), step)
    for field in ("rule", "vectors", "step"):
        assert jax.tree.all(
            jax.tree.map(lambda a, b: bool(jnp.all(a == b)), getattr(moved, field), getattr(state, field))
        )

    ds = anchored(table)
    reference, copy = ds.sel(process="momentum"), ds.sel(process="momentum_nudged")
    assert 0 < float(copy["distance"].max()) < 1e-12
    np.testing.assert_allclose(copy["loss"], reference["loss"], rtol=1e-12)

    monkeypatch.setattr(anchored_module, "nudged", lambda state: state)
    exact = anchored(table)
    unmoved = exact.sel(process="momentum_nudged")
    assert unmoved["loss"].values.tobytes() == exact["loss"].sel(process="momentum").values.tobytes()
    assert float(unmoved["distance"].max()) == 0.0


def test_adams_loss_at_its_edge_on_the_factorization_is_not_determined_by_its_state():
    """The floor on the leaderboard's matrix_factorization-adam entry (docs/compare.md, "The floor"): Adam
    restarted at its onset a float64 rounding away, along any of three directions, misses its own
    window-averaged loss by more than 10% (its loss at the edge is a train of spikes whose timing the last
    bits of the state set), while it stays far closer to Adam than the stable flow does."""
    from eosflow.compare import averaged_loss_error
    from eosflow.leaderboard import ADAPTIVE_SUITE
    from eosflow.precision import precision

    entry = next(entry for entry in ADAPTIVE_SUITE if entry.name == "matrix_factorization-adam")
    table = {**entry.table, "processes": ["adam", "adam_stable_flow"]}
    ds = anchored(table)
    k, steps = int(ds.attrs["anchored_at"]), table["steps"]
    assert compare_dataset(ds).loc["adam_nudged", "relative_distance"] < 0.5
    loss = ds["loss"].sel(process="adam").values
    errors = []
    with precision(table["dtype"]):
        _, problem, _, processes = prepare(table)
        adam = processes["adam"]
        state = anchored_module._states(adam, adam.init(jnp.asarray(problem.w0)), k)[2]
        for key in range(3):
            copy = np.asarray(adam.advance(anchored_module.nudged(state, key=key), steps - k)[1]["loss"])
            errors.append(averaged_loss_error(copy, loss))
    assert min(errors) > 0.05 and np.median(errors) > 0.1, errors


@pytest.mark.parametrize("lr, eigenvalues", [(0.095, (20.0, 10.0, 1.0)), (0.19, (10.3, 4.0, 0.5, 0.05))])
def test_the_floor_from_w0_on_a_quadratic_is_gds_linear_map_of_the_nudge(lr, eigenvalues):
    """On L = 1/2 w^T H w, GD's copy started delta_0 away stays delta_t = (I - lr H)^t delta_0 away (closed form,
    float64 numpy), whatever the step size below 2 / lambda_max; unmoved (size 0) the copy is GD's own run bit
    for bit."""
    table = {
        "name": "quadratic-floor",
        "lr": lr,
        "steps": 60,
        "dtype": "float64",
        "processes": ["gd", "gradient_flow"],
        "problem": {"name": "quadratic", "eigenvalues": list(eigenvalues)},
        "spectrum": {"k_max": 1},
    }
    _, problem, _, processes = prepare(table)
    hessian = np.asarray(problem.objective.hessian(problem.w0), np.float64)
    size = 1e-3
    ds = anchored_module.floor_from_w0(table, size=size)
    delta = np.asarray(anchored_module.nudged(processes["gd"].init(problem.w0), size).w - problem.w0)
    step = np.eye(len(eigenvalues)) - lr * hessian
    expected = [np.linalg.norm(np.linalg.matrix_power(step, t) @ delta) for t in range(table["steps"])]
    np.testing.assert_allclose(ds["distance"].sel(process="gd_nudged").values, expected, rtol=1e-9, atol=1e-18)

    exact = anchored_module.floor_from_w0(table, size=0.0)
    assert exact["loss"].sel(process="gd_nudged").values.tobytes() == exact["loss"].sel(process="gd").values.tobytes()
    assert float(exact["distance"].sel(process="gd_nudged").max()) == 0.0
