"""Comparison metrics against hand-computed values, and `compare` end to end against the run directory."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import tomli_w
from scipy.ndimage import gaussian_filter1d

import eosflow
from eosflow import compare as cmp
from eosflow.experiment import run
from eosflow.load import load_params


# ---- metrics on tiny arrays ----------------------------------------------------------------------
def test_gaussian_smooth_hand_values():
    x = np.array([0.0, 0.0, 3.0, 0.0, 0.0])
    smooth = cmp.gaussian_smooth(x, 1.0)
    e = math.exp
    assert smooth[2] == pytest.approx(3.0 / (1 + 2 * e(-0.5) + 2 * e(-2.0)), rel=1e-12)
    # at the end only the steps inside the array are averaged: weights 1, e^-1/2, e^-2, e^-9/2, e^-8
    assert smooth[0] == pytest.approx(3 * e(-2.0) / (1 + e(-0.5) + e(-2.0) + e(-4.5) + e(-8.0)), rel=1e-12)
    np.testing.assert_array_equal(cmp.gaussian_smooth(x, 0.0), x)
    np.testing.assert_allclose(cmp.gaussian_smooth(np.full(7, 2.5), 3.0), 2.5, rtol=1e-14)
    # a NaN is skipped, not treated as 0: the middle of [1, nan, 3] is the mean of its neighbours
    assert cmp.gaussian_smooth(np.array([1.0, np.nan, 3.0]), 1.0)[1] == pytest.approx(2.0, rel=1e-14)


def test_gaussian_smooth_matches_scipy_normalized_filter():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    x[[5, 50, 51, 120]] = np.nan
    finite = np.isfinite(x)
    total = gaussian_filter1d(np.where(finite, x, 0.0), 7.0, mode="constant", truncate=cmp.TRUNCATE)
    weight = gaussian_filter1d(finite.astype(float), 7.0, mode="constant", truncate=cmp.TRUNCATE)
    np.testing.assert_allclose(cmp.gaussian_smooth(x, 7.0), total / weight, rtol=1e-10)


def test_running_rms_of_a_period_two_oscillation_is_its_amplitude():
    offset = 0.7 * (-1.0) ** np.arange(50)
    np.testing.assert_allclose(cmp.running_rms(offset, 5.0), 0.7, rtol=1e-12)
    assert cmp.envelope_error(np.full(50, 0.7), offset, 5.0) == pytest.approx(0.0, abs=1e-12)
    assert cmp.envelope_error(np.full(50, 1.4), offset, 5.0) == pytest.approx(1.0, rel=1e-12)


def test_gd_records_its_oscillation_from_its_own_iterates(tmp_path):
    """oscillation_k = (lr/4) |g_k - g_(k-1)| must equal |w_(k+1) - 2 w_k + w_(k-1)| / 4 from the saved
    iterates, and on the quartic's period-2 orbit +-a (a^2 = S - 2/lr = 5) it must equal a."""
    spec = {
        "steps": 120,
        "lr": 0.08,
        "dtype": "float64",
        "processes": ["gd"],
        "record": {"params_every": 1},
        "problem": {"name": "quartic", "dim": 3, "sharpness": 30.0, "quartic": 1.0},
        "spectrum": {"k": 1, "k_max": 1},
    }
    run(spec, tmp_path / "run", overwrite=True)
    ds = eosflow.load(tmp_path / "run")
    _, params = load_params(tmp_path / "run", "gd")
    oscillation = ds["oscillation"].sel(process="gd").values
    assert np.isnan(oscillation[0])
    second = np.linalg.norm(params[2:] - 2 * params[1:-1] + params[:-2], axis=1) / 4
    np.testing.assert_allclose(oscillation[1:-1], second, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(oscillation[-10:], np.sqrt(5.0), rtol=1e-6)


@pytest.mark.parametrize(
    ("problem", "lr", "chunk"),
    [
        ({"name": "quartic", "dim": 1, "sharpness": 30.0, "quartic": 1.0}, 0.08, 37),
        ({"name": "matrix_factorization", "dim": 2, "depth": 3, "rank": 1, "target_scale": 5.5}, 0.077, 50),
    ],
)
def test_centre_distance_is_the_distance_between_midpoints_of_consecutive_steps(tmp_path, problem, lr, chunk):
    """centre_distance_t = ||e_(t-1) + e_t|| / 2 (e = w_GD - w_m) from the saved iterates at every step but the
    first (NaN there), across the chunks' boundaries; on the quartic's period-2 orbit +-a about the origin, where
    gradient flow goes, the distance is a and the centre distance 0; compare's rel. centre distance is the ratio of
    their means."""
    steps = 130
    spec = {
        "steps": steps,
        "lr": lr,
        "dtype": "float64",
        "processes": ["gd", "gradient_flow", "rod_flow"],
        "record": {"params_every": 1, "chunk": chunk},
        "problem": problem,
        "spectrum": {"k": 1, "k_max": 1},
    }
    run(spec, tmp_path / "run", overwrite=True)
    ds = eosflow.load(tmp_path / "run")
    gd = load_params(tmp_path / "run", "gd")[1]
    centre = {}
    for p in ("gd", "gradient_flow", "rod_flow"):
        e = gd - load_params(tmp_path / "run", p)[1]
        centre[p] = ds["centre_distance"].sel(process=p).values
        assert np.isnan(centre[p][0]), p
        np.testing.assert_allclose(centre[p][1:], np.linalg.norm(e[:-1] + e[1:], axis=1) / 2, rtol=1e-12, atol=1e-15)
    rows = cmp.compare_run(tmp_path / "run")
    for p in ("gradient_flow", "rod_flow"):
        expected = centre[p][1:].mean() / centre["gradient_flow"][1:].mean()
        assert rows.loc[p, "relative_centre_distance"] == pytest.approx(expected, rel=1e-12)
    assert np.isnan(rows.loc["gd", "relative_centre_distance"])
    if problem["name"] == "quartic":
        late = slice(steps - 30, steps)
        distance = ds["distance"].sel(process="gradient_flow").values[late]
        np.testing.assert_allclose(distance, np.sqrt(5.0), rtol=1e-6)
        assert np.max(centre["gradient_flow"][late]) < 1e-6 * np.sqrt(5.0)


def test_a_run_recorded_before_the_centre_distance_is_reported_without_it(tmp_path, monkeypatch):
    """A run directory written before ``centre_distance`` existed: its column is NaN ("-" on the page), every
    other column as before, and the distance figure has its two old panels."""
    out = tmp_path / "run"
    run({**SPEC, "steps": 80}, out)  # SPEC's first chunk: the report tests below reuse its compiled scans
    fresh = cmp.compare_run(out)
    recorded = cmp.load
    monkeypatch.setattr(cmp, "load", lambda run_dir: recorded(run_dir).drop_vars("centre_distance"))
    old = cmp.compare_run(out)
    assert np.isfinite(fresh.loc["rod_flow", "relative_centre_distance"])
    assert np.isnan(old["relative_centre_distance"]).all()
    pd.testing.assert_frame_equal(
        old.drop(columns="relative_centre_distance"), fresh.drop(columns="relative_centre_distance")
    )
    rows = _page_table(cmp.write_report(out).read_text())
    assert rows["rod_flow"]["relative_centre_distance"] == "-"
    assert (out / "report" / "compare_distance.png").stat().st_size > 0


def test_errors_and_distances_hand_values():
    # |1-2| / (2 + 2): the third step is skipped because the prediction is NaN
    assert cmp.relative_l1_error(np.array([1.0, 2.0, np.nan]), np.array([2.0, 2.0, 5.0])) == pytest.approx(0.25)
    assert math.isnan(cmp.relative_l1_error(np.array([np.nan]), np.array([1.0])))
    # loss 1, 3, 1, 3 unsmoothed (width 0) against a constant prediction 2: 4 * 1 / 8
    assert cmp.loss_prediction_error(np.full(4, 2.0), np.array([1.0, 3.0, 1.0, 3.0]), 0.0) == pytest.approx(0.5)
    assert cmp.mean_distance(np.array([1.0, np.nan, 3.0])) == pytest.approx(2.0)
    # <[1, 2, 3]> / <[2, 2, 2]> = 1; the NaN step of the model drops that step of the baseline too
    assert cmp.relative_distance(np.array([1.0, 2.0, 3.0]), np.full(3, 2.0)) == pytest.approx(1.0)
    assert cmp.relative_distance(np.array([1.0, np.nan, 2.0]), np.array([4.0, 100.0, 2.0])) == pytest.approx(0.5)


def test_cost_hand_values():
    # per step 1 + 2*2 and 1 + 2*4 gradient-equivalents: mean 7; a third derivative counts 4
    assert cmp.gradient_equivalents({"grads": np.array([1, 1]), "hvps": np.array([2, 4])}) == pytest.approx(7.0)
    counts = {"grads": np.array([1, 1]), "hvps": np.array([2, 4]), "third_derivatives": np.array([1, np.nan])}
    assert cmp.gradient_equivalents(counts) == pytest.approx(1 + 4 + 4)
    # chunks [steps, seconds, warm]: the compiling chunk is left out, then the median of 20, 30, 500 ms
    timing = {"chunks": [[100, 10.0, 0], [100, 2.0, 1], [50, 1.5, 1], [100, 50.0, 1]]}
    assert cmp.milliseconds_per_step(timing) == pytest.approx(30.0)
    assert cmp.milliseconds_per_step({"chunks": [[100, 10.0, 0]]}) == pytest.approx(100.0)
    assert math.isnan(cmp.milliseconds_per_step(None))
    # a process none of whose chunks ran warm is timed with its compilation, and the page says so
    timings = {"gd": timing, "rod_flow": {"chunks": [[100, 10.0, 0], [100, 9.0, 0]]}, "gradient_flow": {"chunks": []}}
    assert [cmp.timed_with_compilation(timings.get(p)) for p in ("gd", "rod_flow", "gradient_flow", "x")] == [
        False,
        True,
        False,
        False,
    ]
    note = cmp.compilation_note({"timing": timings}, ["gd", "gradient_flow", "rod_flow"])
    assert note.startswith("ms_per_step of rod_flow includes compilation: every chunk of it compiled")
    assert cmp.compilation_note({"timing": {"gd": timing}}, ["gd"]) == ""


# ---- compare end to end --------------------------------------------------------------------------
SPEC = {
    "name": "compare_test",
    "steps": 160,
    "lr": 0.08,
    "dtype": "float64",
    "processes": ["gd", "gradient_flow", "rod_flow"],
    "problem": {"name": "quartic", "sharpness": 30.0, "quartic": 1.0, "dim": 2},
    "spectrum": {"k": 1, "k_max": 2},
    "record": {"chunk": 80},
}


def _page_table(text: str) -> dict[str, dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def _close(cell: str, value: float) -> None:
    if not np.isfinite(value):
        assert cell == "-"
    else:
        # the page shows 6 significant digits: the rounding error is at most half a unit of the 6th
        half_unit = 0.5 * 10.0 ** (math.floor(math.log10(abs(value))) - 5) if value else 0.0
        assert abs(float(cell) - value) <= half_unit * (1 + 1e-9)


def test_compare_report_numbers_equal_the_run_directory(tmp_path):
    out = tmp_path / "run"
    page = cmp.compare(SPEC, out, progress=False)
    report = out / "report"
    for name in (
        "compare.md",
        "compare.csv",
        "compare_loss.png",
        "compare_sharpness.png",
        "compare_distance.png",
        "compare_envelope.png",
        "compare_cost.png",
    ):
        assert (report / name).stat().st_size > 0, name
    rows = _page_table(page.read_text())
    assert list(rows) == ["gd", "gradient_flow", "rod_flow"]

    # recompute every number independently from the stored trajectories (scipy's filter, plain numpy)
    ds = eosflow.load(out)
    summary = json.loads((out / "summary.json").read_text())
    assert cmp.compilation_note(summary, list(rows)) in page.read_text()  # said under the table when it applies
    w = cmp.SMOOTHING

    def smooth(x):
        ok = np.isfinite(x)
        return gaussian_filter1d(np.where(ok, x, 0.0), w, mode="constant", truncate=4.0) / gaussian_filter1d(
            ok.astype(float), w, mode="constant", truncate=4.0
        )

    gd_loss = ds["loss"].sel(process="gd").values
    gf_distance = ds["distance"].sel(process="gradient_flow").values
    for p in ("gradient_flow", "rod_flow"):
        d = ds["distance"].sel(process=p).values
        _close(rows[p]["mean_distance"], d.mean())
        _close(rows[p]["relative_distance"], d.mean() / gf_distance.mean())
        predicted = ds["predicted_loss"].sel(process=p).values
        _close(rows[p]["loss_error"], np.abs(predicted - smooth(gd_loss)).sum() / smooth(gd_loss).sum())
        cost = ds["grads"].sel(process=p).values + 2 * ds["hvps"].sel(process=p).values
        _close(rows[p]["gradient_equivalents"], cost.mean())
        chunks = summary["timing"][p]["chunks"]  # [steps, seconds, warm]: the first chunk compiles, and so
        # does a chunk whose tracker grew (k = 1 to k_max = 2 here): warm iff a chunk before held as many pairs
        tracked = np.isfinite(ds["eigenvalues"].sel(process=p).values[[0, 80]]).sum(axis=1)
        assert [c[0] for c in chunks] == [80, 80] and [c[2] for c in chunks] == [0, int(tracked[1] == tracked[0])]
        timed = [c for c in chunks if c[2]] or chunks
        _close(rows[p]["ms_per_step"], float(np.median([1e3 * c[1] / c[0] for c in timed])))
    envelope = np.sqrt(smooth(ds["oscillation"].sel(process="gd").values ** 2))
    amplitude = ds["amplitude"].sel(process="rod_flow").values
    _close(rows["rod_flow"]["envelope_error"], np.abs(amplitude - envelope).sum() / envelope.sum())
    # the time-averaged columns: both sides box-averaged over 101 steps (the loop oracle below)
    box_envelope = np.sqrt(_box_oracle(ds["oscillation"].sel(process="gd").values ** 2, cmp.AVERAGING_WINDOW))
    box_amplitude = np.sqrt(_box_oracle(amplitude**2, cmp.AVERAGING_WINDOW))
    _close(rows["rod_flow"]["envelope_error_averaged"], np.abs(box_amplitude - box_envelope).sum() / box_envelope.sum())
    box_loss = _box_oracle(gd_loss, cmp.AVERAGING_WINDOW)
    box_predicted = _box_oracle(ds["predicted_loss"].sel(process="rod_flow").values, cmp.AVERAGING_WINDOW)
    _close(rows["rod_flow"]["loss_error_averaged"], np.abs(box_predicted - box_loss).sum() / box_loss.sum())
    assert rows["gd"]["loss_error_averaged"] == "-" and rows["gd"]["envelope_error_averaged"] == "-"
    _close(rows["gd"]["gradient_equivalents"], (1 + 2 * ds["hvps"].sel(process="gd").values).mean())
    assert rows["gd"]["relative_distance"] == "-" and rows["gd"]["loss_error"] == "-"
    # gradient flow predicts no oscillation (amplitude 0): its envelope error is exactly 1
    assert float(rows["gradient_flow"]["envelope_error"]) == pytest.approx(1.0, rel=1e-12)
    # gradient flow sits at the origin (loss 0) while GD's loss settles at the period-2 orbit's
    # S a^2/2 - Q a^4/4 = 68.75 (a^2 = S - 2/lr with Q = 1): its loss error tends to 1
    assert gd_loss[-1] == pytest.approx(68.75, rel=1e-6)
    assert float(rows["gradient_flow"]["loss_error"]) > 0.9


def test_cli_compare_writes_the_report_and_never_overwrites_silently(tmp_path, capsys):
    from eosflow.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text(tomli_w.dumps({**SPEC, "steps": 80}))  # SPEC's chunks of 80: its compiled scans, reused
    out = tmp_path / "run"
    assert main(["compare", str(spec), "--out", str(out), "--quiet"]) == 0
    page = out / "report" / "compare.md"
    assert str(page) in capsys.readouterr().out
    first, steps = page.read_text(), eosflow.load(out).sizes["step"]
    assert list(_page_table(first)) == ["gd", "gradient_flow", "rod_flow"]
    # the run directory exists: a second compare refuses (status 2, nothing touched) unless --overwrite
    assert main(["compare", str(spec), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and page.read_text() == first
    assert main(["compare", str(spec), "--out", str(out), "--quiet", "--overwrite", "--set", "steps=160"]) == 0
    assert eosflow.load(out).sizes["step"] == steps + 80


# ---- time-averaged metrics -----------------------------------------------------------------------
def _box_oracle(x, window):
    """<x>_W by a plain loop over steps: the mean of the finite x_s with |s - t| <= W // 2."""
    half = window // 2
    out = np.full(len(x), np.nan)
    for t in range(len(x)):
        box = x[max(0, t - half) : t + half + 1]
        box = box[np.isfinite(box)]
        if box.size:
            out[t] = box.mean()
    return out


def test_window_mean_hand_values_and_loop_oracle():
    # [0, 0, 3, 0, 0] with W = 3: the box (t-1..t+1) is one-sided at the ends
    np.testing.assert_allclose(cmp.window_mean(np.array([0.0, 0.0, 3.0, 0.0, 0.0]), 3), [0, 1, 1, 1, 0])
    np.testing.assert_allclose(cmp.window_mean(np.array([1.0, 2.0]), 1), [1.0, 2.0])  # W = 1: identity
    np.testing.assert_allclose(cmp.window_mean(np.array([2.0, np.nan, 4.0]), 3), [2.0, 3.0, 4.0])  # NaN skipped
    assert np.isnan(cmp.window_mean(np.array([1.0, np.nan, np.nan, np.nan]), 3)[-1])
    rng = np.random.default_rng(0)
    for n, window in ((7, 101), (300, 101), (50, 11)):  # a series shorter than the window, too
        x = rng.standard_normal(n)
        x[rng.random(n) < 0.1] = np.nan
        np.testing.assert_allclose(cmp.window_mean(x, window), _box_oracle(x, window), rtol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="odd"):
        cmp.window_mean(np.ones(3), 4)


def test_window_averaged_envelope_of_bursts_and_averaged_errors():
    # a +-0.7 oscillation is its own envelope; bursts of amplitude 2 on half the steps (periods of 10)
    # have the RMS sqrt(2^2 / 2) = sqrt 2 over a box of whole periods, away from the ends
    np.testing.assert_allclose(cmp.window_averaged_envelope(0.7 * (-1.0) ** np.arange(40), 5), 0.7)
    bursts = np.where((np.arange(400) // 5) % 2 == 0, 2.0, 0.0) * (-1.0) ** np.arange(400)
    np.testing.assert_allclose(cmp.window_averaged_envelope(bursts, 101)[100:300], np.sqrt(2.0), rtol=0.02)
    # the pointwise envelope error of a smooth sqrt 2 against the bursts is large, the averaged one small
    smooth = np.full(400, np.sqrt(2.0))
    assert cmp.envelope_error(smooth, bursts, 1.0) > 0.3
    assert cmp.averaged_envelope_error(smooth, bursts, 101) < 0.03
    # loss 1, 3, 1, 3 against 2: the box average of W = 3 at the ends is (1+3)/2 = 2 and inside 5/3 or 7/3
    assert cmp.averaged_loss_error(np.full(4, 2.0), np.array([1.0, 3.0, 1.0, 3.0]), 3) == pytest.approx(
        (1 / 3 + 1 / 3) / (2 + 7 / 3 + 5 / 3 + 2)
    )
    assert cmp.averaged_loss_error(np.full(4, 2.0), np.array([1.0, 3.0, 1.0, 3.0]), 1) == pytest.approx(0.5)


def test_a_dataset_in_memory_is_compared_as_its_run_directory(tmp_path):
    """``compare_dataset(ds)`` needs no summary: ``eosflow.load`` keeps the dropped processes and the
    wall times in ``ds.attrs`` (as JSON text, so the dataset still saves to netCDF). The quartic's
    central flow is dropped at step 1 (its centre starts outside {S <= 2/lr}): its status must say so."""
    table = {
        **SPEC,
        "steps": 60,
        "processes": ["gd", "gradient_flow", "central_flow"],
        "problem": {"name": "quartic", "sharpness": 30.0, "quartic": 1.0, "dim": 1},
        "spectrum": {"k": 1, "k_max": 1},
        "record": {"chunk": 30},
    }
    run(table, tmp_path / "run")
    from_directory = cmp.compare_run(tmp_path / "run")
    assert from_directory.loc["central_flow", "status"].startswith("dropped: ")
    assert np.isfinite(from_directory.loc["gradient_flow", "ms_per_step"])
    ds = eosflow.load(tmp_path / "run")
    pd.testing.assert_frame_equal(cmp.compare_dataset(ds), from_directory)
    ds.to_netcdf(tmp_path / "run.nc", engine="scipy")
    import xarray as xr

    with xr.open_dataset(tmp_path / "run.nc", engine="scipy") as saved:
        pd.testing.assert_frame_equal(cmp.compare_dataset(saved), from_directory)


def test_relative_distances_without_their_yardstick_are_nan_and_say_why():
    """A run without gradient flow (the README's first try, before it listed it) has no yardstick for the relative
    distances: they are NaN and compare_dataset warns, naming the process to add; with it they are finite, and a
    run of optimizers alone (no model to measure by it) says nothing."""
    import warnings

    import jax.numpy as jnp

    problem = eosflow.Problem.from_function(lambda w: jnp.sum(jnp.cos(w) + w**2), np.linspace(0.1, 1.0, 4))
    both = eosflow.simulate(problem, lr=0.3, steps=20, processes=["gd", "gradient_flow", "rod_flow"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(cmp.compare_dataset(both).loc["rod_flow", "relative_distance"])
        cmp.compare_dataset(both.sel(process=["gd"]))
        optimizers = eosflow.simulate(problem, lr=0.3, steps=5, processes=["gd", "momentum"])
        assert np.isnan(cmp.compare_dataset(optimizers).loc["momentum", "relative_distance"])  # no model to measure
    without = both.sel(process=["gd", "rod_flow"])
    with pytest.warns(UserWarning, match="divide by gradient_flow's distance to gd .* add it"):
        table = cmp.compare_dataset(without)
    assert np.isnan(table.loc["rod_flow", "relative_distance"]) and np.isfinite(table.loc["rod_flow", "mean_distance"])


def test_eosflow_compare_is_reached_from_the_package_and_imported_only_then():
    code = (
        "import sys, eosflow; before = 'pandas' in sys.modules or 'matplotlib' in sys.modules; "
        "print(before, eosflow.compare.compare_dataset.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "compare_dataset"]


def test_a_diverged_reference_is_flagged_in_the_table_with_its_reason():
    """GD at lr S = 3 on a quadratic doubles its distance to the minimum each step: the run stops, and the
    table's reference row says why (a model's row says ``dropped``; the reference's divergence ends the run)."""
    import jax.numpy as jnp

    problem = eosflow.Problem.from_function(lambda w: jnp.sum(w**2), np.ones(3))  # S = 2
    ds = eosflow.simulate(problem, lr=1.5, steps=100, processes=["gd", "gradient_flow"])
    assert ds.attrs["status"] == "diverged"
    table = cmp.compare_dataset(ds)
    assert table.loc["gd", "status"] == f"diverged: {ds.attrs['reason']}"
    assert table.loc["gradient_flow", "status"] == "ok"


def test_a_dropped_models_divergent_step_is_not_scored_and_compare_needs_gd_first(tmp_path, capsys):
    """The quartic's rod and edge flows at lr S = 6 diverge at step 2 (loss NaN, amplitude ~1e254): that step
    was scored (envelope error 2.3e249, while the averaged column skipped it after an overflow warning). Now
    it is NaN like every later one, and no overflow warning is printed. compare refuses a model listed first
    (it scored GD against the rod flow) and a run with nothing to compare."""
    import tomllib

    from eosflow.cli import main

    table = tomllib.loads((cmp.Path(__file__).parents[1] / "examples" / "compare_quartic.toml").read_text())
    table.update(steps=40, lr=0.2, processes=["gd", "gradient_flow", "rod_flow", "edge_flow"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(table, tmp_path / "run")
        ds = eosflow.load(tmp_path / "run")
        rows = cmp.compare_dataset(ds)
    for model in ("rod_flow", "edge_flow"):
        assert rows.loc[model, "status"].startswith("dropped: loss became nan at step 2")
        assert np.isinf(ds["distance"].sel(process=model).values[2])  # on disk, as recorded
        assert rows.loc[model, "envelope_error"] < 10 and rows.loc[model, "envelope_error_averaged"] < 10
        assert np.isfinite(rows.loc[model, "mean_distance"])
    assert ds["amplitude"].sel(process="edge_flow").values[2] > 1e100
    spec = tmp_path / "spec.toml"
    for processes, message in [
        (["rod_flow", "gd"], "'rod_flow' is a model of one: list 'gd' first"),
        (["gd"], "compare needs models to compare with 'gd'"),
    ]:
        spec.write_text(tomli_w.dumps({**table, "processes": processes}))
        assert main(["compare", str(spec), "--out", str(tmp_path / "refused"), "--quiet"]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("steps, lr", [(1, 0.05), (20, 1e-30)])
def test_a_run_with_no_positive_distance_gets_its_report(tmp_path, capsys, steps, lr):
    """One step, or a step size too small to move: every distance is 0, and the report's log-scaled distance
    panel raised from matplotlib ("Data cannot be log-scaled"), so `eosflow run` ended in a traceback."""
    from eosflow.cli import main

    spec = tmp_path / "spec.toml"
    table = {"steps": steps, "lr": lr, "processes": ["gd", "gradient_flow"], "problem": {"name": "quadratic"}}
    spec.write_text(tomli_w.dumps(table))
    assert main(["run", str(spec), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert f"completed: {steps} step{'' if steps == 1 else 's'} in" in capsys.readouterr().out  # not "1 steps"
    assert (tmp_path / "run" / "report" / "compare_distance.png").exists()


def test_critical_set_notes_name_the_setting_to_raise():
    """From the rows alone: every tracked pair critical at k = k_max (raise k_max), before the tracker
    grew to k_max (grow_every), and a set cut by max_critical; a complete set, or a process without
    a critical set, has no note."""
    import xarray as xr

    from eosflow.compare import critical_set_note

    nan = np.nan
    eigenvalues = np.array(
        [
            [[11.0, 10.5, nan], [11.0, 10.5, 9.9], [11.0, 9.0, 8.0]],  # 2 tracked of k_max 3, then 3
            [[11.0, 10.5, 9.0], [11.0, 10.5, 10.2], [11.0, 10.0, 8.0]],  # cut by max_critical = 2 at step 1
            [[11.0, 9.0, nan], [11.0, 9.0, nan], [9.0, 8.0, nan]],  # complete
            [[nan] * 3] * 3,  # gd-like: no critical set
        ]
    )
    critical = np.array([[2, 3, 1], [2, 2, 2], [1, 1, 0], [nan] * 3])
    complete = np.array([[0, 0, 1], [1, 0, 1], [1, 1, 1], [nan] * 3])
    ds = xr.Dataset(
        {
            "eigenvalues": (("process", "step", "eig"), eigenvalues),
            "critical": (("process", "step"), critical),
            "critical_complete": (("process", "step"), complete),
        },
        coords={"process": ["a", "b", "c", "gd"], "step": [0, 1, 2]},
    )
    a, b = critical_set_note(ds, "a"), critical_set_note(ds, "b")
    assert "at 2 of 3 steps (the first: step 0)" in a and "2-3 tracked" in a and "`spectrum.grow_every`" in a
    assert "at 1 of 3 steps (the first: step 1) more eigenvalues were critical than the 2 directions" in b
    assert "max_critical" in b and "k_max" not in b
    assert critical_set_note(ds, "c") == "" and critical_set_note(ds, "gd") == ""
    only_k_max = ds.isel(step=[1])
    assert critical_set_note(only_k_max, "a").endswith(
        "raise `spectrum.k_max` (3; `[a.spectrum] k_max` for this process alone)"
    )
    # a process whose own tracker stops at 2 (`[a.spectrum] k_max = 2`) in a record padded to another's 3:
    # its limit is the summary's, so the note says to raise it, not to grow to a width it cannot reach
    own = ds.isel(step=[0]).assign_attrs(spectrum_k_max=json.dumps({"a": 2, "b": 3}))
    named = "raise `spectrum.k_max` (2; `[a.spectrum] k_max` for this process alone)"
    assert critical_set_note(own, "a").endswith(named)
    assert "grow_every" in critical_set_note(ds.isel(step=[0]), "a")  # without the summary: the record's width


@pytest.mark.parametrize("command", ["run", "compare"])
def test_cli_warns_of_an_incomplete_critical_set(tmp_path, capsys, command):
    """The sharp valley (d = 2) at the edge with one tracked pair: its one eigenvalue at 2/lr is critical
    and the second is not measured, so `eosflow run` and `eosflow compare` say to raise k_max; with both
    tracked they say nothing."""
    from eosflow.cli import main

    # the third: GD tracks 2, the central flow 1 by its own table, so the record is 2 wide and the note
    # names the flow's own limit
    own = "[central_flow.spectrum]\nk = 1\nk_max = 1\n"
    for case, (k_max, extra, warned) in enumerate(((1, "", True), (2, "", False), (2, own, True))):
        spec = tmp_path / f"spec{case}.toml"
        spec.write_text(
            'steps = 60\nlr = 0.2\ndtype = "float64"\nprocesses = ["gd", "central_flow"]\n[problem]\n'
            'name = "sharp_valley"\nsharpness = 5.0\nrate = 1.0\nbend = 0.0\neps = 0.1\ny0 = 0.1\n'
            f"[spectrum]\nk = {k_max}\nk_max = {k_max}\n" + extra
        )
        assert main([command, str(spec), "--out", str(tmp_path / f"{command}{case}"), "--quiet"]) == 0
        err = capsys.readouterr().err
        named = "raise `spectrum.k_max` (1; `[central_flow.spectrum] k_max` for this process alone)" in err
        assert ("eosflow: warning: central_flow: at " in err and named and "grow_every" not in err) == warned, err


def test_a_reference_without_a_yardstick_is_said_to_have_none(tmp_path):
    """The warning told to add `sgd_stable_flow` (and the page named `nls_stable_flow`), processes that do not
    exist, and adding one was an error (from a probe): a yardstick is named only where it exists."""
    assert cmp.baseline_of("gd") == "gradient_flow" and cmp.baseline_of("adam") == "adam_stable_flow"
    assert cmp.baseline_of("sgd") is None and cmp.baseline_of("nls") is None
    table = {
        "steps": 20,
        "lr": 0.05,
        "dtype": "float64",
        "processes": ["sgd", "langevin"],
        "problem": {"name": "linear_regression", "dim": 4, "n_train": 64},
        "spectrum": {"every": 0},
        "record": {"chunk": 10},
    }
    run(table, tmp_path / "r")
    with pytest.warns(UserWarning, match="sgd has no yardstick") as caught:
        page = cmp.write_report(tmp_path / "r").read_text()
    assert not any("sgd_stable_flow" in str(w.message) for w in caught)
    assert "NaN: sgd has none" in page and "sgd_stable_flow" not in page


def test_a_dropped_models_amplitude_is_not_a_predicted_collapse():
    """sqrt of a nansum over the covariance read 0 at every step after a model was dropped (all its entries NaN),
    a predicted collapse that the envelope error then counted (central flow dropped at step 1 of 100: 1.07, where
    its two recorded steps give 5.03; from a probe). An unused slot (NaN beside recorded entries) still adds 0,
    and a recorded zero covariance (no critical direction) is an amplitude of 0."""
    import xarray as xr

    from eosflow.compare import envelope_error, predicted_amplitude

    covariance = np.array([[0.0, 0.0, np.nan], [1.0, 3.0, np.nan], [4.0, np.nan, np.nan], *[[np.nan] * 3] * 5])
    ds = xr.Dataset(
        {"covariance": (("process", "step", "slot"), covariance[None])},
        coords={"process": ["central_flow"], "step": np.arange(8)},
    )
    amplitude = predicted_amplitude(ds, "central_flow")
    np.testing.assert_array_equal(amplitude[:3], [0.0, 2.0, 2.0])
    assert np.isnan(amplitude[3:]).all()
    oscillation = np.full(8, 0.5)
    assert envelope_error(amplitude, oscillation, width=0.0) == pytest.approx(
        envelope_error(amplitude[:3], oscillation[:3], width=0.0)
    )


def test_without_a_yardstick_the_distance_figure_has_no_empty_ratio_panels(tmp_path):
    """gd with rod flow alone (no gradient flow, the yardstick): the ratio panels were drawn empty, one labelled
    "distance / None's" (from a probe). Now the figure is the absolute distance alone; with the yardstick, three."""
    from matplotlib.figure import Figure

    import eosflow
    from eosflow.compare import distance_panels
    from eosflow.experiment import run

    table = {**SPEC, "steps": 20, "problem": {**SPEC["problem"], "dim": 1}, "spectrum": {"k": 1, "k_max": 1}}
    for processes, count in ((["gd", "rod_flow"], 1), (["gd", "gradient_flow", "rod_flow"], 3)):
        out = tmp_path / str(count)
        run({**table, "processes": processes}, out)
        panels, draw = distance_panels(eosflow.load(out))
        axes = Figure().subplots(panels, 1, squeeze=False)[:, 0]
        draw(*axes)
        assert panels == count and "None" not in " ".join(ax.get_ylabel() for ax in axes)
        assert all(ax.lines for ax in axes)


def test_a_dropped_models_blow_up_is_left_out_of_the_figures(tmp_path):
    """The central flow dropped at step 1 of the quartic (its centre is outside {S <= 2/lr}) kept its loss of
    -1.4e15 in the report's and compare's loss and sharpness figures, which set the axis and flattened every other
    curve (from a probe). The row that broke the limit is left out of the figures, and only that row."""
    import json

    import eosflow
    from eosflow.compare import without_blow_up
    from eosflow.experiment import run

    table = {**SPEC, "steps": 30, "processes": ["gd", "gradient_flow", "central_flow"]}
    run({**table, "problem": {**SPEC["problem"], "dim": 1}, "spectrum": {"k": 1, "k_max": 1}}, tmp_path / "run")
    ds = eosflow.load(tmp_path / "run")
    assert "central_flow" in json.loads(ds.attrs["dropped_processes"])
    for process in ("gd", "central_flow"):
        loss = ds["loss"].sel(process=process).values
        drawn = without_blow_up(ds, process, loss)
        recorded = np.flatnonzero(~np.isnan(loss))
        changed = np.flatnonzero(np.isnan(drawn) != np.isnan(loss))
        assert list(changed) == ([recorded[-1]] if process == "central_flow" else [])
        assert abs(loss[recorded[-1]]) > 1e3 * abs(loss[0]) or process == "gd"  # the blow-up row it leaves out


@pytest.mark.parametrize(("a", "b", "width"), [(1.0, 3.0, 1.0), (5.0, 2.0, 0.5), (0.25, 0.5, 3.0), (2.0, 2.0, 1.0)])
def test_the_loss_error_floor_is_the_references_own_loss_against_its_smoothed_loss(a, b, width):
    """GD's loss a, b over two steps: Lbar = ((a + b e) / (1 + e), (a e + b) / (1 + e)) with e = exp(-1 / 2w^2), so
    its own loss misses it by |a - b| e / (1 + e) at each step and the floor is 2 |a - b| e / ((1 + e)(a + b)),
    in every row of the table and under it; a model predicting GD's loss exactly scores the floor."""
    import xarray as xr

    e = math.exp(-1.0 / (2 * width**2))
    loss = np.array([[a, b], [a, b], [7.0, 0.5]])  # gd, a model predicting gd's loss, another
    ds = xr.Dataset(
        {"loss": (("process", "step"), loss)}, coords={"process": ["gd", "gradient_flow", "rod_flow"], "step": [0, 1]}
    )
    table = cmp.compare_dataset(ds, summary={}, width=width)
    floor = 2 * abs(a - b) * e / ((1 + e) * (a + b))
    np.testing.assert_allclose(table["loss_error_floor"].to_numpy(), floor, rtol=1e-12, atol=1e-15)
    assert table.loc["gradient_flow", "loss_error"] == pytest.approx(floor, rel=1e-12, abs=1e-15)
    assert table.loc["rod_flow", "loss_error"] != pytest.approx(floor)
    assert cmp.loss_error_floor_line(table, "gd").startswith(f"loss_error floor: {cmp.format_number(floor)}, ")
