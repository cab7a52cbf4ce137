"""Anomalous diffusion: the exponent fit, its interval, the theory curve, and the report section.

Oracles: the c = 1/p law of power-law spectra (derived in docs/sgd_limiting_dynamics.md) on the
exact expected displacement, exactly linear Brownian motion for the interval's coverage, the
SGD process on a quadratic for the theory curve, and direct loops for the displacements.
"""

import numpy as np
import pytest

import eosflow
from eosflow.experiment import prepare, run
from eosflow.report import make_report
from eosflow.report_sgd import sgd_section
from eosflow.theory import diffusion

LR, MOMENTUM = 0.5, 0.9  # lr * lambda_1 = 0.5: the top modes are underdamped, as at the edge of stability
MODES = 10_000


def power_law_lags(power: float, first_mode: float, last_mode: float, points: int = 24) -> np.ndarray:
    """Lags k at which n*(k) = (k lr lambda_1 / (1 - beta))^(1/p) modes have relaxed, for n* in
    [first_mode, last_mode] (lambda_1 = 1)."""
    scale = (1 - MOMENTUM) / LR
    return np.unique(np.geomspace(first_mode**power * scale, last_mode**power * scale, points).astype(np.int64))


@pytest.mark.parametrize("power", [1.5, 2.0, 3.0])
def test_exponent_fit_recovers_one_over_p(power):
    """lambda_n = n^-p, Sigma_g ~ H: E Delta_k ~ k^(1/p) while 30 <= n*(k) <= N / 30.

    The window starts past the underdamped modes (lr lambda_n > (1 - sqrt(beta))^2, n < 33 for
    p = 1.5) and the discreteness of the first modes, and ends well before the finite spectrum
    saturates Delta (a (n*/N)^(p - 1) / p correction, largest for p = 1.5)."""
    eigenvalues = np.arange(1, MODES + 1.0) ** -power
    lags = power_law_lags(power, 30, MODES / 30)
    curve = diffusion.diffusion_curve(eigenvalues, eigenvalues, LR, MOMENTUM, lags)
    fit = diffusion.fit_exponent(lags, curve, window=(lags[0], lags[-1]))
    assert fit.exponent == pytest.approx(1 / power, abs=0.07)
    assert fit.low <= fit.exponent <= fit.high


def test_exponent_is_not_one_over_p_outside_the_window():
    """At short lags (n* < 10: underdamped, oscillating modes) the same spectrum gives c ~ 1."""
    eigenvalues = np.arange(1, MODES + 1.0) ** -1.5
    lags = power_law_lags(1.5, 2, 10)
    curve = diffusion.diffusion_curve(eigenvalues, eigenvalues, LR, MOMENTUM, lags)
    assert diffusion.fit_exponent(lags, curve, window=(lags[0], lags[-1])).exponent > 1 / 1.5 + 0.2


def test_jackknife_interval_covers_brownian_motion():
    """Random walks have E Delta_k = k exactly (c = 1); the 95% interval should cover 1 ~95% of
    the time, and not by being uselessly wide."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    trials = 60
    for _ in range(trials):
        walk = np.cumsum(rng.standard_normal((2000, 50)), axis=0)
        curves = diffusion.segment_displacements(walk, 10)
        lags = np.arange(curves.shape[1])
        fit = diffusion.fit_exponent(lags[1:], curves[:, 1:])
        covered += fit.low <= 1.0 <= fit.high
        widths.append(fit.high - fit.low)
    assert 0.85 <= covered / trials <= 1.0
    assert np.median(widths) < 0.5


def test_displacements_by_definition():
    params = np.random.default_rng(1).standard_normal((12, 3))
    np.testing.assert_allclose(
        diffusion.global_displacement(params, 2), [np.sum((params[k] - params[2]) ** 2) for k in range(2, 12)]
    )
    np.testing.assert_allclose(
        diffusion.local_displacement(params), [np.sum((params[k + 1] - params[k]) ** 2) for k in range(11)]
    )
    segments = diffusion.segment_displacements(params, 3)
    np.testing.assert_allclose(segments[1], diffusion.global_displacement(params[4:8]))


def test_theory_curve_matches_sgd_on_a_quadratic():
    """E Delta_k of the exact recursion vs SGD (isotropic gradient noise) on a diagonal quadratic."""
    lr, beta = 0.1, 0.9
    eigenvalues = np.geomspace(15.0, 0.3, 24)  # lr h from 1.5 down to 0.03: relaxation <= ~35 steps
    table = {
        "lr": lr,
        "dtype": "float64",
        "processes": ["sgd"],
        "spectrum": {"every": 0},
        "problem": {"name": "quadratic", "eigenvalues": list(eigenvalues), "rotate": False, "init_scale": 0.01},
        "sgd": {"momentum": beta, "gradient_noise": 1.0, "batch_size": 1},
    }
    _, problem, _, processes = prepare(table)
    sgd = processes["sgd"]
    state, _ = sgd.advance(sgd.init(problem.w0), 1000)
    _, rows = sgd.advance(state, 24000)
    curves = diffusion.segment_displacements(np.asarray(rows["position"]), 120)
    lags = np.array([1, 2, 5, 10, 30, 100, 199])
    measured = curves[:, lags]
    expected = diffusion.diffusion_curve(eigenvalues, 1.0, lr, beta, lags)
    errors = measured.std(axis=0, ddof=1) / np.sqrt(len(curves))
    assert np.all(np.abs(measured.mean(axis=0) - expected) < 4 * errors + 0.02 * expected), (
        measured.mean(axis=0),
        expected,
    )
    # the continuous model misses SGD's short-lag displacement when lr h is large
    continuous = diffusion.diffusion_curve(eigenvalues, 1.0, lr, beta, lags[:1], model="continuous")
    assert expected[0] / continuous[0] > 1.1
    # the local displacement: exact sum of step variances, and its small-lr h limit
    assert np.mean(rows["step_norm_sq"]) == pytest.approx(
        diffusion.mode_local_displacement(eigenvalues, 1.0, lr, beta), rel=0.03
    )
    small = diffusion.predicted_local_displacement(len(eigenvalues) * 1.0, lr, beta)
    assert diffusion.mode_local_displacement([1e-6], 1.0, lr, beta) == pytest.approx(small / 24, rel=1e-6)


def test_report_section(tmp_path):
    table = {
        "steps": 1000,
        "lr": 0.1,
        "dtype": "float64",
        "processes": ["sgd", "langevin"],
        "problem": {"name": "linear_regression", "dim": 8, "n_train": 64, "decay": 1.0},
        "sgd": {"batch_size": 8, "momentum": 0.9, "loss_every": 10},
        "spectrum": {"every": 0},
        "record": {"params_every": 1, "chunk": 500},
    }
    run(table, tmp_path / "sgd")
    text = (make_report(tmp_path / "sgd")).read_text()
    report = tmp_path / "sgd" / "report"
    assert (report / "sgd_diffusion.png").exists() and (report / "sgd_phase_portraits.png").exists()
    text = text.split("## SGD limiting dynamics")[1]
    assert "| sgd, 8 segments |" in text and "| langevin, 8 segments |" in text
    # the reported exponent is the fit of the saved positions after the reported checkpoint
    line = next(row for row in text.splitlines() if row.startswith("| sgd, 8 segments |"))
    exponent = float(line.split("|")[2])
    checkpoint = int(text.split("of their final levels): step ")[1].split(".")[0])
    steps, params = eosflow.load_params(tmp_path / "sgd", "sgd")
    curves = diffusion.segment_displacements(params[steps >= checkpoint], 8)
    lags = np.arange(curves.shape[1])
    assert exponent == pytest.approx(diffusion.fit_exponent(lags[1:], curves[:, 1:]).exponent, abs=1e-3)
    # the top-direction variances are those of the theory (a linear model: within sampling error)
    row = next(r for r in text.splitlines() if r.startswith("| u_1 |"))
    measured, langevin, discrete = (float(v) for v in row.split("|")[2:5])
    assert measured == pytest.approx(discrete, rel=0.35)
    # runs without SGD get no section
    without_sgd = eosflow.load(tmp_path / "sgd").sel(process=["langevin"])
    assert sgd_section(without_sgd, tmp_path / "sgd", report) == ""


def test_too_few_saved_parameters_are_counted_not_called_missing(tmp_path):
    """Five vectors saved after the checkpoint read "No parameters were saved ... (set record.params_every)"
    (from a probe): the section now says how many there are and that the fit needs eight."""
    table = {
        "steps": 600,
        "lr": 0.1,
        "dtype": "float64",
        "processes": ["sgd"],
        "problem": {"name": "linear_regression", "dim": 8, "n_train": 64, "decay": 1.0},
        "sgd": {"batch_size": 8},
        "spectrum": {"every": 0},
        "record": {"params_every": 100, "chunk": 300},
    }
    run(table, tmp_path / "sgd")
    text = make_report(tmp_path / "sgd").read_text().split("## SGD limiting dynamics")[1]
    checkpoint = int(text.split("of their final levels): step ")[1].split(".")[0])
    steps, _ = eosflow.load_params(tmp_path / "sgd", "sgd")
    after = int(np.sum(steps >= checkpoint))
    assert 0 < after < 8
    assert f"{after} of sgd's saved parameter vectors fall at or after the checkpoint (step {checkpoint})" in text
