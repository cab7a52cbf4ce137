"""Flatland line searches: the acceptance test, the step-size guarantee, the references, the cap.

Oracles: numpy evaluations of a quadratic and its closed-form segment smoothness |Hg|/|g|; the
segment smoothness of a network sampled on a fine grid of the segment; the Zhang-Hager and
Grippo recursions recomputed in numpy from the recorded losses; the monotone Armijo inequality
checked on the recorded trajectory; the dense float64 Hessian (its last-layer bias block and its
top eigenvalue, numpy.linalg.eigh).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.config import SpecError
from eosflow.experiment import prepare
from eosflow.optim.flatland import flat_sharpness, line_search

C = 1e-4
TINY_MLP = {"name": "mlp", "dataset": "digits", "n_train": 40, "n_test": 30, "width": 8, "depth": 1}


def tiny_run(processes: dict, steps: int, lr: float = 0.05, every: int = 0):
    """Rows of each process after ``steps`` steps on the tiny float64 MLP, and the problem."""
    table = {
        "steps": steps,
        "lr": lr,
        "dtype": "float64",
        "processes": list(processes),
        "problem": TINY_MLP,
        "spectrum": {"every": every, "k": 1, "k_max": 1, "tol": 1e-6, "max_iters": 100},
        **processes,
    }
    _, problem, _, built = prepare(table)
    rows = {name: p.advance(p.init(problem.w0), steps)[1] for name, p in built.items()}
    return problem, {name: {k: np.asarray(v) for k, v in r.items()} for name, r in rows.items()}


def quadratic(seed=0, d=6):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    hessian = basis @ np.diag(np.geomspace(20.0, 0.05, d)) @ basis.T
    return hessian, (lambda w: 0.5 * w @ jnp.asarray(hessian) @ w)


def test_search_on_a_quadratic_passes_the_test_and_its_step_is_large():
    """Accepted eta passes L(w - eta g) <= R - c eta |g|^2 and eta/delta fails it; hence with delta = 1/2,
    eta * l >= 1 - c for the closed-form segment smoothness l = |Hg| / |g| of a quadratic."""
    hessian, value = quadratic()
    rng = np.random.default_rng(1)
    search = jax.jit(
        lambda w, r, t: line_search(value, w, value(w), jax.grad(value)(w), r, t, c=C, delta=0.5, max_evals=60)
    )
    for _ in range(40):
        w = rng.standard_normal(6)
        loss, grad = 0.5 * w @ hessian @ w, hessian @ w
        reference = loss * (1 + rng.choice([0.0, 0.3, 2.0]))
        trial = 10 ** rng.uniform(-4, 2)
        found = search(jnp.asarray(w), reference, trial)
        eta, evals = float(found.lr), int(found.evals)

        def numpy_test(step, w=w, grad=grad, reference=reference):
            new = w - step * grad
            return 0.5 * new @ hessian @ new <= reference - C * step * grad @ grad

        assert bool(found.accepted) and numpy_test(eta)
        assert not numpy_test(2 * eta)  # the search stopped at the first failure of the doubling grid
        segment_smoothness = np.linalg.norm(hessian @ grad) / np.linalg.norm(grad)
        assert eta * segment_smoothness >= 1 - C
        # evaluation count of the grid trial * 2^j: j + 2 when extrapolating (j >= 0), |j| + 1 backtracking
        j = round(np.log2(eta / trial))
        assert evals == (j + 2 if j >= 0 else -j + 1)
        np.testing.assert_allclose(float(found.loss), 0.5 * (w - eta * grad) @ hessian @ (w - eta * grad), rtol=1e-12)


def test_step_bound_against_the_sampled_segment_smoothness_of_a_network():
    """eta >= 2 delta (1 - c) / l(w, eta/delta), l(w, e) = sup_{0<s<=e} |g(w) - g(w - s g)| / (s |g|),
    sampled on a fine grid of the segment, at points along a short NLS run (R_k > L(w_k) included)."""
    problem, rows = tiny_run({"nls": {}}, 12)
    objective = problem.objective
    grad_fn = jax.jit(lambda w: objective.grad(w))
    for k in range(0, 12, 3):
        w, eta = rows["nls"]["position"][k], float(rows["nls"]["lr"][k])
        assert rows["nls"]["loss_evals"][k] < 30 and rows["nls"]["accepted"][k]
        g = np.asarray(grad_fn(w))
        steps = np.linspace(0, 2 * eta, 801)[1:]
        moved = jax.vmap(lambda s, w=w, g=g: grad_fn(w - s * g))(jnp.asarray(steps))
        ratios = np.linalg.norm(g - np.asarray(moved), axis=1) / (steps * np.linalg.norm(g))
        assert eta * ratios.max() >= (1 - C) * (1 - 1e-3), (k, eta, ratios.max())


def test_monotone_reference_is_armijo_and_xi_zero_is_monotone():
    """R_k = L(w_k): the loss never increases, by at least c eta |g|^2; Zhang-Hager with xi = 0 is the same run."""
    _, rows = tiny_run({"armijo": {}, "nls": {"xi": 0.0}}, 60, lr=0.5)
    armijo = rows["armijo"]
    loss, eta, grad_norm = armijo["loss"], armijo["lr"], armijo["grad_norm"]
    assert np.all(loss[1:] <= loss[:-1] - C * eta[:-1] * grad_norm[:-1] ** 2 + 1e-14)
    assert np.all(armijo["reference_loss"] == loss)
    np.testing.assert_allclose(rows["nls"]["position"], armijo["position"], rtol=0, atol=1e-12)


def zhang_hager(losses: np.ndarray, xi: float) -> np.ndarray:
    """R_k = max(C_k, L_k) with Q_0 = 1, C_0 = L_0, Q_{k+1} = xi Q_k + 1, C_{k+1} = (xi Q_k C_k + L_{k+1}) / Q_{k+1}."""
    average, weight, out = losses[0], 1.0, []
    for k, loss in enumerate(losses):
        if k:
            new_weight = xi * weight + 1
            average, weight = (xi * weight * average + loss) / new_weight, new_weight
        out.append(max(average, loss))
    return np.array(out)


@pytest.mark.parametrize("kind", ["zhang_hager", "max"])
def test_non_monotone_references_follow_their_recursions(kind):
    _, rows = tiny_run({"nls": {"reference": kind, "xi": 0.9, "memory": 4}}, 50, lr=0.5)
    r = rows["nls"]
    loss = r["loss"]
    if kind == "zhang_hager":
        expected = zhang_hager(loss, 0.9)
    else:
        expected = np.array([loss[max(0, k - 3) : k + 1].max() for k in range(len(loss))])  # last M = 4
    np.testing.assert_allclose(r["reference_loss"], expected, rtol=1e-12)
    assert np.all(loss[1:] <= r["reference_loss"][:-1] - C * r["lr"][:-1] * r["grad_norm"][:-1] ** 2 + 1e-14)
    assert np.any(loss[1:] > loss[:-1])  # non-monotone: the loss does go up at some steps


def test_cap_keeps_eta_below_two_over_the_flat_sharpness():
    """S_flat (the mse bias block) equals the dense Hessian's last-layer bias block, bounds S(w0) below,
    and capped runs never step beyond cap_fraction * 2 / S_flat (or max_lr)."""
    problem, rows = tiny_run({"nls": {"cap": True, "cap_fraction": 0.4}, "ponls": {"max_lr": 0.3}}, 15, lr=5.0)
    hessian = np.asarray(jax.jit(jax.hessian(problem.objective.value))(problem.w0))
    bias_block = hessian[-10:, -10:]  # ravel order: the readout's bias comes last
    np.testing.assert_allclose(bias_block, np.eye(10) * flat_sharpness(problem.objective), atol=1e-12)
    assert flat_sharpness(problem.objective) == pytest.approx(1.0)
    assert np.linalg.eigvalsh(hessian)[-1] >= 1.0
    assert rows["nls"]["lr"].max() <= 0.8 * (1 + 1e-12) and np.any(np.isclose(rows["nls"]["lr"], 0.8, rtol=1e-12))
    assert rows["ponls"]["lr"].max() <= 0.3 + 1e-15


def test_short_run_is_large_against_the_dense_sharpness():
    """eta_k S_k >= 1 - c at measured steps with S from numpy.linalg.eigh of the dense Hessian; the
    tracked sharpness, lr_sharpness = eta_k S_k and the test accuracy agree with their oracles."""
    problem, rows = tiny_run({"nls": {"accuracy_every": 5}}, 30, every=5)
    r = rows["nls"]
    hessian_fn = jax.jit(lambda w: problem.objective.hessian(w))
    for k in range(0, 30, 5):
        dense = np.linalg.eigvalsh(np.asarray(hessian_fn(r["position"][k])))[-1]
        assert r["lr"][k] * dense >= 1 - C
        np.testing.assert_allclose(r["sharpness"][k], dense, rtol=1e-4)
        np.testing.assert_allclose(r["lr_sharpness"][k], r["lr"][k] * dense, rtol=1e-4)
        test_data = problem.test_objective.data
        assert r["test_accuracy"][k] == pytest.approx(float(problem.accuracy(r["position"][k], test_data)))
    assert np.isnan(r["test_accuracy"][1]) and np.isnan(r["sharpness"][1])
    assert np.mean(r["lr_sharpness"][::5] > 2) >= 0.5


def test_refinement_bisects_the_bracket_towards_the_equality_point():
    """With r refinements the accepted step passes the test and a failed trial lies within a factor
    2^(2^-r) above it (numpy), the step is at least the grid's, and r more evaluations are spent."""
    hessian, value = quadratic()
    rng = np.random.default_rng(2)
    for refine in (1, 2, 4):
        search = jax.jit(
            lambda w, r, t, refine=refine: line_search(
                value, w, value(w), jax.grad(value)(w), r, t, c=C, delta=0.5, max_evals=60, refine=refine
            )
        )
        grid = jax.jit(
            lambda w, r, t: line_search(value, w, value(w), jax.grad(value)(w), r, t, c=C, delta=0.5, max_evals=60)
        )
        for _ in range(15):
            w = rng.standard_normal(6)
            loss, grad = 0.5 * w @ hessian @ w, hessian @ w
            reference, trial = loss * (1 + rng.choice([0.0, 0.3, 2.0])), 10 ** rng.uniform(-4, 2)
            found, coarse = search(jnp.asarray(w), reference, trial), grid(jnp.asarray(w), reference, trial)
            eta = float(found.lr)

            def numpy_test(step, w=w, grad=grad, reference=reference):
                new = w - step * grad
                return 0.5 * new @ hessian @ new <= reference - C * step * grad @ grad

            assert bool(found.accepted) and numpy_test(eta) and eta >= float(coarse.lr)
            assert not numpy_test(eta * 2 ** (2.0**-refine) * (1 + 1e-12))
            assert int(found.evals) == int(coarse.evals) + refine


NETWORKS = {  # two float64 digits MLPs; the tanh one is where the grid search left eta S < 2 on most steps
    "tanh_8": TINY_MLP,
    "tanh_16x2": {
        "name": "mlp",
        "dataset": "digits",
        "n_train": 100,
        "n_test": 30,
        "width": 16,
        "depth": 2,
        "activation": "tanh",
    },
}


@pytest.mark.parametrize("network", list(NETWORKS))
def test_nls_runs_at_the_edge_of_stability_from_any_first_trial_step(network):
    """NLS (refine = 2, the default) from first trial steps 1e-3 ... 1: eta_k S_k > 2 on >= 90% of the
    steps after step 20 (S by the tracker, checked against eigh above), and eta_k l(w_k, 2 eta_k) >= 1 - c
    on every step, l the segment smoothness sampled on 60 points of the segment."""
    steps = 100
    table = {
        "steps": steps,
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["nls"],
        "problem": NETWORKS[network],
        "spectrum": {"every": 1, "k": 1, "k_max": 1, "tol": 1e-6, "max_iters": 100},
        "nls": {},
    }
    _, problem, _, built = prepare(table)
    process, objective = built["nls"], problem.objective
    fractions = np.linspace(1, 60, 60) / 30  # s / eta on (0, 2]

    @jax.jit
    def smoothness(w, eta):
        g = objective.grad(w)
        moved = jax.vmap(lambda s: objective.grad(w - s * eta * g))(jnp.asarray(fractions))
        return jnp.max(jnp.linalg.norm(g - moved, axis=1) / (fractions * eta * jnp.linalg.norm(g)))

    for trial in (1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0):  # one compilation: the first trial is the state's lr
        state = process.init(problem.w0)._replace(lr=jnp.asarray(trial, problem.w0.dtype))
        rows = {key: np.asarray(value) for key, value in process.advance(state, steps)[1].items()}
        assert np.all(rows["accepted"]) and rows["loss_evals"].max() < 30
        assert np.mean(rows["lr_sharpness"][20:] > 2) >= 0.9, (trial, np.mean(rows["lr_sharpness"][20:] > 2))
        segment = np.asarray(jax.vmap(smoothness)(jnp.asarray(rows["position"]), jnp.asarray(rows["lr"])))
        assert np.all(rows["lr"] * segment >= 1 - C), trial


def test_evaluation_budget():
    hessian, value = quadratic()
    w = jnp.ones(6)
    loss, grad = value(w), jax.grad(value)(w)
    grow = line_search(value, w, loss, grad, loss, 1e-6, c=C, delta=0.5, max_evals=3)
    assert int(grow.evals) == 3 and bool(grow.accepted) and float(grow.lr) == pytest.approx(4e-6)
    shrink = line_search(value, w, loss, grad, loss, 1e6, c=C, delta=0.5, max_evals=2)
    assert int(shrink.evals) == 2 and not bool(shrink.accepted) and float(shrink.lr) == pytest.approx(5e5)


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match="nls.delta"):
        prepare({"processes": ["nls"], "problem": TINY_MLP, "nls": {"delta": 1.5}})
    with pytest.raises(SpecError, match="armijo.cap"):
        prepare({"processes": ["armijo"], "problem": {**TINY_MLP, "loss": "cross_entropy"}, "armijo": {"cap": True}})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_polyak_trial_that_is_not_positive_falls_back_to_the_warm_start(seed):
    """L = w'Hw/2 + offset. Below 0 (offset -5, |w| small) the Polyak trial L/(c|g|^2) is negative: ponls took
    eta < 0 (ascent; 23 such steps on sharp_valley, from a probe). Now it takes the warm start there, so it is
    nls's run bit for bit. At a stationary point with L > 0 (w0 = 0, offset 10) the trial was inf and the run
    'diverged' with NaN; now w stays at w0 and every eta is the warm start."""
    import eosflow

    hessian, loss = quadratic(seed)
    w0 = np.random.default_rng(seed).standard_normal(6) * 0.1
    below = eosflow.Problem.from_function(lambda w: loss(w) - 5.0, jnp.asarray(w0))
    ds = eosflow.simulate(below, lr=0.05, steps=40, processes=["nls", "ponls"], spectrum={"every": 0})
    assert float(ds["loss"].sel(process="ponls").max()) < 0  # the trial was negative at every step
    assert (ds["lr"].sel(process="ponls").values > 0).all()
    for key in ("loss", "lr", "grad_norm"):
        np.testing.assert_array_equal(ds[key].sel(process="ponls").values, ds[key].sel(process="nls").values)
    np.testing.assert_array_equal(ds["distance"].sel(process="ponls").values, 0.0)  # ||w_ponls - w_nls||
    stationary = eosflow.Problem.from_function(lambda w: loss(w) + 10.0, jnp.zeros(6))
    ds = eosflow.simulate(stationary, lr=0.05, steps=5, processes=["ponls"], spectrum={"every": 0})
    assert ds.attrs["status"] == "completed", ds.attrs.get("reason")
    np.testing.assert_array_equal(ds["loss"].sel(process="ponls").values, 10.0)
    np.testing.assert_array_equal(ds["lr"].sel(process="ponls").values, 0.05)


@pytest.mark.parametrize("scale, capped", [(0.1, False), (0.5, False), (3.0, True)])
def test_the_cap_is_refused_where_the_sharpness_falls_below_its_floor(scale, capped):
    """Least squares without a bias: its Hessian, the input covariance, is below S_flat = 1 when the inputs'
    variance is (scale < 1), so 2 / S_flat is no bound on 2 / S; the cap took eta <= 1 at S = 0.151 there (from a
    probe). Oracle: the dense Hessian's top eigenvalue at w0 against S_flat."""
    table = {
        "steps": 3,
        "lr": 0.5,
        "dtype": "float64",
        "processes": ["nls"],
        "problem": {"name": "linear_regression", "dim": 4, "n_train": 64, "scale": scale},
        "nls": {"cap": True},
    }
    problem = prepare({**table, "nls": {}})[1]
    top = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(problem.objective.value))(problem.w0)))[-1]
    assert (top >= flat_sharpness(problem.objective)) == capped, top
    if capped:
        prepare(table)
    else:
        with pytest.raises(SpecError, match=r"`nls.cap` = true .* sharpness is [0-9.]+ at w0, below it"):
            prepare(table)


@pytest.mark.parametrize(
    "process, options, unused",
    [
        ("nls", {"polyak_scale": 3.0}, "nls.polyak_scale"),
        ("nls", {"cap_fraction": 0.2}, "nls.cap_fraction"),
        ("nls", {"memory": 3}, "nls.memory"),
        ("sgd", {"noise_examples": 10}, "sgd.noise_examples"),
        ("ponls", {"polyak_scale": 3.0}, None),
        ("nls", {"reference": "max", "memory": 3}, None),
        ("sgd", {"noise_examples": 10, "noise_every": 5}, None),
    ],
)
def test_an_option_without_effect_in_its_configuration_is_named(process, options, unused):
    """Options the configuration ignores ran without a word (from a probe); those that act stay quiet."""
    import warnings

    from eosflow.config import SpecWarning

    table = {"steps": 2, "lr": 0.05, "processes": [process], process: options}
    table["problem"] = {"name": "linear_regression", "dim": 4, "n_train": 64}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(table)
    named = [
        str(w.message) for w in caught if issubclass(w.category, SpecWarning) and "has no effect" in str(w.message)
    ]
    assert len(named) == (unused is not None), named
    assert unused is None or f"`{unused}` = " in named[0]


@pytest.mark.parametrize("max_evals", [1, 30])
def test_a_divergence_says_when_the_search_ran_out_of_its_budget(tmp_path, max_evals):
    """lr = 50 with one evaluation per search: every search took the refused first trial, and the run diverged
    with no word of it (GD's reason says where its edge ratio was; from a probe). With the budget to backtrack,
    the same start does not diverge, and no hint is given where every search was accepted."""
    from eosflow.experiment import run
    from eosflow.store import RunStore

    options = {"max_evals": max_evals, "refine": 0, "extrapolate": False}
    table = {
        "name": "budget",
        "steps": 20,
        "lr": 50.0,
        "dtype": "float32",
        "processes": ["nls"],
        "problem": TINY_MLP,
        "nls": options,
        "spectrum": {"every": 0},
        "record": {"chunk": 10},
    }
    outcome = run(table, tmp_path / "run")
    rows = RunStore(tmp_path / "run").read_process("nls")
    if max_evals == 1:
        assert outcome.status == "diverged" and not rows["accepted"].any()
        steps = rows["accepted"].size
        assert f"its line search ran out of its 1 loss evaluations at {steps} of {steps} steps" in outcome.reason
    else:
        assert outcome.status == "completed" and rows["accepted"].all() and "line search" not in outcome.reason


def test_the_report_tabulates_each_searched_step_size_against_its_rows(tmp_path):
    """A run of nls, armijo and gd: the report's step-size table holds nls's and armijo's rows (GD's constant
    step is not searched), each cell recomputed in numpy from the run's recorded eta_k, eta_k S_k, loss
    evaluations and acceptances; the figures it names are written; the progress line shows eta_k S_k as
    recorded, not the spec's lr times S."""
    import re

    from eosflow.experiment import run
    from eosflow.load import load
    from eosflow.progress import status_line
    from eosflow.report import make_report
    from eosflow.store import RunStore

    spectrum, record = {"every": 3, "k": 1, "k_max": 1}, {"chunk": 8}
    table = dict(name="steps", steps=24, lr=0.05, dtype="float32", processes=["nls", "armijo", "gd"])
    run(
        {**table, "problem": TINY_MLP, "nls": {"accuracy_every": 4}, "spectrum": spectrum, "record": record},
        tmp_path / "run",
    )
    page = make_report(tmp_path / "run").read_text()
    section = page[page.index("## Step sizes chosen at every step") :]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in section.splitlines() if line.startswith("| ")}
    assert set(rows) == {"process", "nls", "armijo"}
    ds = load(tmp_path / "run")
    for name in ("nls", "armijo"):
        recorded = RunStore(tmp_path / "run").read_process(name)
        eta_s = recorded["lr_sharpness"][np.isfinite(recorded["lr_sharpness"])]
        assert eta_s.size == 8
        expected = [
            f"{np.median(recorded['lr']):.4g}",
            f"{np.mean(eta_s > 2):.0%}",
            f"{eta_s.min():.4g}",
            f"{np.median(eta_s):.4g}",
            f"{np.mean(recorded['loss_evals']):.2f}",
            f"{int(np.sum(~recorded['accepted'].astype(bool)))} |",
        ]
        assert rows[name] == expected
        last = ds.sel(process=name)
        line = status_line({k: last[k].values for k in ("loss", "sharpness", "lr_sharpness")}, 0.05)
        assert re.search(r"lr\*S (\S+)", line)[1] == f"{eta_s[-1]:.3f}"
    assert (tmp_path / "run/report/step_size.png").is_file() and (tmp_path / "run/report/accuracy.png").is_file()


def test_the_progress_line_shows_the_edge_ratio_where_it_is_not_lr_s_over_2():
    """GD's edge ratio is lr S / 2 and is not repeated; Adam's (S_P / (38 / lr)) is; the last finite values."""
    from eosflow.progress import status_line

    gd = {"loss": [1.0, 0.5], "sharpness": [4.0, np.nan], "lr_sharpness": [1.6, np.nan], "edge_ratio": [0.8, np.nan]}
    assert status_line(gd, 0.4) == "loss 0.5  S 4  lr*S 1.600"
    adam = {"loss": [0.3], "sharpness": [50.0], "lr_sharpness": [0.5], "edge_ratio": [0.97]}
    assert status_line(adam, 0.01) == "loss 0.3  S 50  lr*S 0.500  edge ratio 0.970"
    assert status_line({"loss": [0.2], "sharpness": [3.0]}, 0.5) == "loss 0.2  S 3  lr*S 1.500"
